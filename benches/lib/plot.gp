# Plots of benches/run:
#   gnuplot -e "dir='OUT'; io=1; snap_size=N; snap_ext=N" benches/lib/plot.gp
# io: draw the I/O plot; snap_size, snap_ext: how many rows those snapshot
# series have (a panel without rows is left out).
# Reads OUT/ratios.dat and OUT/snap-*.dat (written by benchlib.py reduce),
# writes OUT/latest.png (I/O ratios) and OUT/snapshot.png (start+commit cost).

set datafile missing "NaN"
fss = "xfs btrfs ext4"
colors = "#1b9e77 #d95f02 #7570b3"

if (io) {
    set terminal pngcairo size 1400,1000 font "sans,10"
    set output dir."/latest.png"
    set multiplot layout 2,1 title "IOPS relative to the native baseline of the same run (log scale; 1 = as fast as native; dashed: 0.95)"
    set style data histogram
    set style histogram cluster gap 1
    set style fill solid 0.85 border -1
    set boxwidth 0.9
    set logscale y
    set yrange [0.02:50]
    set ytics ("0.05" 0.05, "0.1" 0.1, "0.2" 0.2, "0.5" 0.5, "1" 1, "2" 2, "5" 5, "10" 10, "20" 20)
    set grid ytics
    set xtics rotate by -25 scale 0 font ",9"
    set key top left horizontal

    set title "files: (b), (c) and (d) against (a) the native file"
    plot dir."/ratios.dat" using 2:xtic(1) title "(b) reflinkfs passthrough" lc rgb word(colors, 1), \
         ''                using 3 title "(c) reflinkfs passthrough=off" lc rgb word(colors, 3), \
         ''                using 4 title "(d) qemu-storage-daemon" lc rgb word(colors, 2), \
         0.95 with lines dt 2 lc rgb "black" notitle, 1 with lines lc rgb "gray" notitle

    set title "behind a loop device (--direct-io=on, 4096-byte sectors): loop over (b), (c), (d) against loop over (a)"
    plot dir."/ratios.dat" using 5:xtic(1) title "loop over (b)" lc rgb word(colors, 1), \
         ''                using 6 title "loop over (c)" lc rgb word(colors, 3), \
         ''                using 7 title "loop over (d)" lc rgb word(colors, 2), \
         0.95 with lines dt 2 lc rgb "black" notitle, 1 with lines lc rgb "gray" notitle
    unset multiplot
    reset
    set datafile missing "NaN"
}

panels = (snap_size > 0) + (snap_ext > 0)
if (panels > 0) {
    set terminal pngcairo size (panels == 2 ? 1400 : 750),550 font "sans,10"
    set output dir."/snapshot.png"
    set multiplot layout 1,panels title "Start + commit of a volume through the mount, against copying the same image (median ms, log-log)"
    set style data linespoints
    set logscale xy
    set grid xtics ytics mxtics mytics
    set key top left vertical font ",9"
    set ylabel "ms"

    if (snap_size > 0) {
        set title "by image size (10% data in 100 extents)"
        set xlabel "image size (GiB)"
        set xrange [0.7:150]
        plot for [i=1:3] dir."/snap-size-".word(fss, i).".dat" using 1:2 \
                title "reflinkfs start+commit, ".word(fss, i) lw 2 pt 7 lc rgb word(colors, i), \
             for [i=1:3] dir."/snap-size-".word(fss, i).".dat" using 1:3 \
                title "cp --sparse=always + fsync, ".word(fss, i) dt 2 pt 6 lc rgb word(colors, i)
    }
    if (snap_ext > 0) {
        set title "by extent count (10 GiB image, 1 GiB of data)"
        set xlabel "extents"
        set xrange [70:15000]
        plot for [i=1:3] dir."/snap-extents-".word(fss, i).".dat" using 1:2 \
                title "reflinkfs start+commit, ".word(fss, i) lw 2 pt 7 lc rgb word(colors, i), \
             for [i=1:3] dir."/snap-extents-".word(fss, i).".dat" using 1:3 \
                title "cp --sparse=always + fsync, ".word(fss, i) dt 2 pt 6 lc rgb word(colors, i)
    }
    unset multiplot
}
