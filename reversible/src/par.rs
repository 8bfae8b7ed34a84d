//! Row loops that use rayon only when there is enough work: waking the pool's workers for a
//! few thousand floats costs more than the loop (and dominates small problems).

use rayon::prelude::*;

/// Elements of work below which a loop stays on the calling thread.
pub const PAR_MIN: usize = 1 << 15;

/// Calls `f(i, row)` for each `width`-wide row of `data` (the last may be shorter), in
/// parallel when `work` (elements touched in all) reaches [`PAR_MIN`].
pub fn for_rows<T: Send>(
    data: &mut [T],
    width: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if width == 0 {
        return;
    }
    if work < PAR_MIN {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        data.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}
