//! Sorted, disjoint byte ranges `[start, end)`.

/// Adds `[s, e)` to `out`, merging with the last range when they touch.
/// Ranges must come in ascending order.
pub fn push(out: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    if s >= e {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 >= s => last.1 = last.1.max(e),
        _ => out.push((s, e)),
    }
}

/// The union of several sorted range lists.
pub fn union(lists: &[Vec<(u64, u64)>]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = lists.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut out = Vec::with_capacity(all.len());
    for (s, e) in all {
        push(&mut out, s, e);
    }
    out
}

/// The ranges cut to `[0, limit)`.
pub fn clip(list: &[(u64, u64)], limit: u64) -> Vec<(u64, u64)> {
    list.iter()
        .filter(|r| r.0 < limit)
        .map(|&(s, e)| (s, e.min(limit)))
        .collect()
}

/// Total bytes.
pub fn total(list: &[(u64, u64)]) -> u64 {
    list.iter().map(|r| r.1 - r.0).sum()
}

/// The ranges split into pieces of at most `max` bytes.
pub fn pieces(list: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in list {
        let mut o = s;
        while o < e {
            let end = e.min(o + max);
            out.push((o, end));
            o = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_and_clip_cuts() {
        let u = union(&[vec![(0, 4), (10, 12)], vec![(3, 6), (12, 14), (20, 21)]]);
        assert_eq!(u, vec![(0, 6), (10, 14), (20, 21)]);
        assert_eq!(clip(&u, 11), vec![(0, 6), (10, 11)]);
        assert_eq!(total(&u), 11);
        assert_eq!(pieces(&[(0, 10)], 4), vec![(0, 4), (4, 8), (8, 10)]);
    }
}
