//! The stable bucket sort: a counting sort by bucket, which keeps positions in order inside a
//! bucket, i.e. a stable order by the key `bucket·N + position`. O(N + buckets).

/// Fills `perm` (`len = buckets.len()`) with positions in sorted order: `perm[slot] = pos`.
/// Every bucket must be `< n_buckets`. `counts` is scratch.
pub fn counting_sort(buckets: &[u32], n_buckets: usize, perm: &mut [u32], counts: &mut Vec<u32>) {
    counts.clear();
    counts.resize(n_buckets + 1, 0);
    for &b in buckets {
        counts[b as usize + 1] += 1;
    }
    for i in 1..=n_buckets {
        counts[i] += counts[i - 1];
    }
    for (pos, &b) in buckets.iter().enumerate() {
        let slot = &mut counts[b as usize];
        perm[*slot as usize] = pos as u32;
        *slot += 1;
    }
}
