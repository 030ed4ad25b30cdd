fn main() -> std::process::ExitCode {
    reflinkfs::cli::main()
}
