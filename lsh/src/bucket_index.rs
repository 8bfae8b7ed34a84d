//! The bucket index of one (head, round) of a decoding LSH layer: which earlier positions a
//! new query attends to, found without re-sorting.
//!
//! LSH attention over `n` positions sorts them by `(bucket, position)` and cuts the order into
//! chunks of `m`; a query in chunk `c` sees chunks `c` and `c − 1` (chunk 0 the last chunk; a
//! single chunk has no look-back). The index holds the positions inserted so far as
//! per-bucket lists (positions arrive in increasing order, so each list is sorted) and a
//! Fenwick tree of the bucket counts. After position `t` is inserted, the positions `0..=t`
//! form exactly the sorted order a full forward over them would make; [`BucketIndex::window`]
//! lists the keys the last query of that forward sees: its rank is `O(log b)` away, and each
//! chunk's positions are read off the lists (`O(log b)` per bucket they span).

use rayon::prelude::*;

use crate::cached_attention::NO_KEY;

/// Counts per bucket with prefix sums and rank search, `O(log b)` each.
#[derive(Debug, Clone)]
struct Fenwick {
    tree: Vec<u32>,
}

impl Fenwick {
    fn new(n: usize) -> Self {
        Self {
            tree: vec![0; n + 1],
        }
    }

    fn add(&mut self, i: usize) {
        let mut i = i + 1;
        while i < self.tree.len() {
            self.tree[i] += 1;
            i += i & i.wrapping_neg();
        }
    }

    /// Elements in buckets `0..i`.
    fn prefix(&self, i: usize) -> usize {
        let (mut i, mut s) = (i, 0usize);
        while i > 0 {
            s += self.tree[i] as usize;
            i &= i - 1;
        }
        s
    }

    /// The bucket holding the element of rank `k` (0-based; `k` < total) and the rank of its
    /// bucket's first element.
    fn find(&self, k: usize) -> (usize, usize) {
        let n = self.tree.len() - 1;
        let (mut pos, mut before) = (0usize, 0usize);
        let mut step = n.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= n && before + (self.tree[next] as usize) <= k {
                pos = next;
                before += self.tree[next] as usize;
            }
            step >>= 1;
        }
        (pos, before)
    }
}

/// Positions by bucket for one (head, round) of a decoding LSH layer.
#[derive(Debug, Clone)]
pub struct BucketIndex {
    counts: Fenwick,
    lists: Vec<Vec<u32>>,
    len: usize,
}

impl BucketIndex {
    pub fn new(n_buckets: usize) -> Self {
        Self {
            counts: Fenwick::new(n_buckets.max(1)),
            lists: vec![Vec::new(); n_buckets.max(1)],
            len: 0,
        }
    }

    /// Positions inserted so far (`0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the index holds (lists at their capacity, the tree, the list headers).
    pub fn bytes(&self) -> usize {
        let lists: usize = self.lists.iter().map(|l| 4 * l.capacity()).sum();
        lists + 4 * self.counts.tree.len() + std::mem::size_of::<Vec<u32>>() * self.lists.len()
    }

    /// Inserts the next position (`len()`) in `bucket` (below the index's bucket count) and
    /// returns its rank in the sorted order of `0..=len()`.
    pub fn insert(&mut self, bucket: u32) -> usize {
        let b = (bucket as usize).min(self.lists.len() - 1);
        let rank = self.counts.prefix(b) + self.lists[b].len();
        self.lists[b].push(self.len as u32);
        self.counts.add(b);
        self.len += 1;
        rank
    }

    /// Appends to `out` the positions of the sorted chunk `c` (ranks `c·m .. (c+1)·m` of the
    /// positions inserted so far).
    pub fn chunk_positions(&self, c: usize, m: usize, out: &mut Vec<u32>) {
        let (start, end) = (c * m, ((c + 1) * m).min(self.len));
        let mut rank = start;
        while rank < end {
            let (b, first) = self.counts.find(rank);
            let list = &self.lists[b];
            let take = (list.len() - (rank - first)).min(end - rank);
            out.extend_from_slice(&list[rank - first..rank - first + take]);
            rank += take;
        }
    }

    /// Appends to `out` the keys the query of rank `rank` sees among the positions inserted so
    /// far, with chunks of `m`: its look-back chunk (if any), then its own chunk.
    pub fn window(&self, rank: usize, m: usize, out: &mut Vec<u32>) {
        let m = m.max(1);
        let count = self.len.div_ceil(m);
        let c = rank / m;
        if count > 1 {
            self.chunk_positions((c + count - 1) % count, m, out);
        }
        self.chunk_positions(c, m, out);
    }
}

/// Inserts `rows` new positions into the indexes of every (head, round) (`indexes`:
/// `[heads·rounds]`, `buckets`: `[heads, rounds, rows]`) and returns each new query's keys, as
/// [`crate::CachedKeys::Lists`] of width `2m` wants them: `[heads, rounds, rows, 2m]`, padded
/// with [`NO_KEY`]. Query `i` sees the positions inserted before it and itself, so a block of
/// rows gives what one row at a time gives.
pub fn insert_and_list(
    indexes: &mut [BucketIndex],
    buckets: &[u32],
    rows: usize,
    m: usize,
) -> Vec<u32> {
    let width = 2 * m.max(1);
    if rows == 0 {
        return Vec::new();
    }
    let mut lists = vec![NO_KEY; indexes.len() * rows * width];
    let fill = |(index, lists): (&mut BucketIndex, &mut [u32]), buckets: &[u32]| {
        let mut keys = Vec::with_capacity(width);
        for (list, &b) in lists.chunks_exact_mut(width).zip(buckets) {
            let rank = index.insert(b);
            keys.clear();
            index.window(rank, m, &mut keys);
            list[..keys.len()].copy_from_slice(&keys);
        }
    };
    if rows < 16 {
        // A decoding step: a few hundred positions to list, less than waking the pool.
        for ((index, lists), buckets) in indexes
            .iter_mut()
            .zip(lists.chunks_mut(rows * width))
            .zip(buckets.chunks(rows))
        {
            fill((index, lists), buckets);
        }
    } else {
        indexes
            .par_iter_mut()
            .zip(lists.par_chunks_mut(rows * width))
            .zip(buckets.par_chunks(rows))
            .for_each(|((index, lists), buckets)| fill((index, lists), buckets));
    }
    lists
}

/// Inserts `rows` new positions into the indexes of every (head, round), as
/// [`insert_and_list`] does, without listing their keys (a prefill whose attention a full
/// forward computed).
pub fn insert_all(indexes: &mut [BucketIndex], buckets: &[u32], rows: usize) {
    indexes
        .par_iter_mut()
        .zip(buckets.par_chunks(rows.max(1)))
        .for_each(|(index, buckets)| {
            for &b in buckets {
                index.insert(b);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use reformer_engine::Rng;

    /// The keys of the last query by sorting the prefix.
    fn brute(buckets: &[u32], m: usize) -> Vec<u32> {
        let n = buckets.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&p| (buckets[p as usize], p));
        let rank = order.iter().position(|&p| p as usize == n - 1).unwrap();
        let count = n.div_ceil(m);
        let c = rank / m;
        let chunk = |c: usize| order[c * m..((c + 1) * m).min(n)].to_vec();
        let mut out = Vec::new();
        if count > 1 {
            out.extend(chunk((c + count - 1) % count));
        }
        out.extend(chunk(c));
        out
    }

    #[test]
    fn every_prefix_sees_what_sorting_it_gives() {
        let mut rng = Rng::new(3);
        for (n_buckets, m) in [(1, 4), (2, 3), (8, 4), (64, 8), (7, 1), (1000, 5)] {
            let mut idx = BucketIndex::new(n_buckets);
            let mut buckets = Vec::new();
            for _ in 0..300 {
                let b = (rng.uniform() * n_buckets as f32) as u32 % n_buckets as u32;
                buckets.push(b);
                let rank = idx.insert(b);
                let mut got = Vec::new();
                idx.window(rank, m, &mut got);
                assert_eq!(got, brute(&buckets, m), "buckets {n_buckets}, m {m}");
            }
        }
    }

    #[test]
    fn fenwick_finds_every_rank() {
        let mut f = Fenwick::new(5);
        for b in [0, 2, 2, 4, 4, 4] {
            f.add(b);
        }
        let want = [(0, 0), (2, 1), (2, 1), (4, 3), (4, 3), (4, 3)];
        for (k, w) in want.iter().enumerate() {
            assert_eq!(f.find(k), *w);
        }
        assert_eq!(f.prefix(3), 3);
    }
}
