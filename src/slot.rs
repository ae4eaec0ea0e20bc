//! Where a tensor sits inside a buffer that holds a whole layer in one tier, and in which form:
//! the one layout every tier and every backend shares. A slot is the tensor's data (`numel`
//! elements of `repr.dtype`) and, for scaled fp8, its f32 scales after it, each part aligned.
//!
//! The scales' encoding (native-endian f32, one after another) and the bounds a slot must keep
//! inside its buffer are written here once; backends, host copies and the conversions into and out
//! of a buffer on the host all go through them.

use crate::convert::{Engine, Quant, TensorBytes};
use crate::error::{Error, Result};
use crate::tiers::Repr;

/// Where one tensor sits inside a buffer (host copy or device memory), and in which form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    pub offset: usize,
    pub repr: Repr,
    pub numel: usize,
    /// Size of dimension 0 for tensors of two or more dimensions, else 1: the per-channel groups.
    pub rows: usize,
    /// Where the `repr.scale_count(rows)` f32 scales start (only meaningful when there are some).
    pub scales_offset: usize,
}

/// Bytes one scale takes in a buffer.
pub(crate) const SCALE_BYTES: usize = std::mem::size_of::<f32>();

impl TensorSlot {
    pub fn data_bytes(&self) -> usize {
        self.numel * self.repr.dtype.size()
    }

    pub fn scale_count(&self) -> usize {
        self.repr.scale_count(self.rows)
    }

    /// Bytes the scales take.
    pub fn scale_bytes(&self) -> usize {
        self.scale_count() * SCALE_BYTES
    }

    /// The byte range of the data.
    pub fn data_range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.data_bytes()
    }

    /// The byte range of the scales (empty when unscaled).
    pub fn scales_range(&self) -> std::ops::Range<usize> {
        self.scales_offset..self.scales_offset + self.scale_bytes()
    }

    /// Refuses a slot that does not lie inside a buffer of `len` bytes, or whose data runs into
    /// its scales, before anything reads or writes it.
    pub fn check_in(&self, len: usize) -> Result<()> {
        let (data, scales) = (self.data_range(), self.scales_range());
        let overlap = !scales.is_empty() && data.end > scales.start;
        if overlap || data.end > len || scales.end > len {
            return Err(Error::invalid("tensor slot lies outside its buffer"));
        }
        Ok(())
    }

    /// Elements per row (per scale, when scaled per row): 0 for an empty tensor.
    pub fn row_len(&self) -> usize {
        self.numel / self.rows.max(1)
    }

    /// Whether the slot converts by whole rows as well as whole: unscaled, or scaled per row
    /// (each row's scale depends on that row alone). One scale for the whole tensor needs it all.
    pub fn converts_in_parts(&self) -> bool {
        self.scale_count() == 0 || (self.repr.quant == Quant::PerChannel && self.row_len() > 0)
    }

    /// Refuses a run of `count` elements from `first_element` on that is not inside the slot
    /// inside a buffer of `len` bytes, or not whole rows of a slot scaled per row: how a tensor
    /// larger than a staging area arrives.
    pub fn check_part(&self, len: usize, first_element: usize, count: usize) -> Result<()> {
        let whole_rows = self.scale_count() == 0
            || (self.converts_in_parts()
                && first_element.is_multiple_of(self.row_len())
                && count.is_multiple_of(self.row_len()));
        if !whole_rows {
            return Err(Error::invalid(
                "a tensor scaled per tensor converts whole, one scaled per row by whole rows",
            ));
        }
        self.check_in(len)?;
        if first_element + count > self.numel {
            return Err(Error::invalid("tensor part lies outside its slot"));
        }
        Ok(())
    }

    /// The byte range of elements `first_element..first_element + count` of the data.
    pub fn part_range(&self, first_element: usize, count: usize) -> std::ops::Range<usize> {
        let size = self.repr.dtype.size();
        let start = self.offset + first_element * size;
        start..start + count * size
    }
}

/// Lays tensors out one after another in one buffer, each part aligned; returns the slots and the
/// total size. `shapes` gives (numel, rows, repr) per tensor.
pub fn layout(shapes: impl IntoIterator<Item = (usize, usize, Repr)>) -> (Vec<TensorSlot>, usize) {
    let mut offset = 0;
    let mut slots = Vec::new();
    for (numel, rows, repr) in shapes {
        let data_offset = offset;
        offset = crate::host::align_up(offset + numel * repr.dtype.size());
        let scales_offset = offset;
        offset = crate::host::align_up(offset + repr.scale_count(rows) * SCALE_BYTES);
        slots.push(TensorSlot {
            offset: data_offset,
            repr,
            numel,
            rows,
            scales_offset,
        });
    }
    (slots, offset)
}

/// Scales as the bytes a buffer holds them in.
pub fn scales_to_bytes(scales: &[f32]) -> Vec<u8> {
    scales.iter().flat_map(|s| s.to_ne_bytes()).collect()
}

/// Writes `scales` into `out`, which has room for exactly as many.
pub fn write_scales(out: &mut [u8], scales: &[f32]) {
    for (out, scale) in out.chunks_exact_mut(SCALE_BYTES).zip(scales) {
        out.copy_from_slice(&scale.to_ne_bytes());
    }
}

/// Reads the scales `bytes` holds.
pub fn read_scales(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(SCALE_BYTES)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Converts `src` on the host into `slot`'s form inside `buffer` (the whole buffer the slot lies
/// in), writing the data and, for scaled fp8, the scales after it.
pub fn convert_into_slot(
    src: TensorBytes<'_>,
    slot: &TensorSlot,
    buffer: &mut [u8],
    engine: Engine,
) -> Result<()> {
    slot.check_in(buffer.len())?;
    let (data, scales) = (slot.data_range(), slot.scales_range());
    // Checked: the data ends before the scales start whenever there are scales, so `back`
    // starts with them.
    let (front, back) = buffer.split_at_mut(data.end.max(scales.start));
    let converted = crate::convert::convert_with(
        src,
        slot.rows,
        &mut front[data],
        slot.repr.dtype,
        slot.repr.quant,
        engine,
    )?;
    if converted.len() != slot.scale_count() {
        return Err(Error::invalid(
            "conversion produced an unexpected number of scales",
        ));
    }
    write_scales(&mut back[..scales.len()], &converted);
    Ok(())
}

/// Converts on the host a run of whole elements of an unscaled source into `slot`'s data,
/// starting at element `first_element`: a tensor streamed through a staging area smaller than
/// itself. Element by element into an unscaled slot; by whole rows into one scaled per row, each
/// row's scale written to its place.
pub fn convert_into_slot_part(
    src: TensorBytes<'_>,
    slot: &TensorSlot,
    buffer: &mut [u8],
    first_element: usize,
    engine: Engine,
) -> Result<()> {
    if !src.scales.is_empty() {
        return Err(Error::invalid(
            "a scaled tensor converts whole, not in parts",
        ));
    }
    let count = src.bytes.len() / src.dtype.size();
    slot.check_part(buffer.len(), first_element, count)?;
    let data = slot.part_range(first_element, count);
    let (rows, quant, scales) = match slot.scale_count() {
        0 => (1, Quant::None, 0..0),
        _ => {
            let (first_row, rows) = (first_element / slot.row_len(), count / slot.row_len());
            let start = slot.scales_offset + first_row * SCALE_BYTES;
            (rows, slot.repr.quant, start..start + rows * SCALE_BYTES)
        }
    };
    // Checked: the data ends before the scales start whenever there are scales.
    let (front, back) = buffer.split_at_mut(data.end.max(scales.start));
    let converted =
        crate::convert::convert_with(src, rows, &mut front[data], slot.repr.dtype, quant, engine)?;
    if converted.len() * SCALE_BYTES != scales.len() {
        return Err(Error::invalid(
            "conversion produced an unexpected number of scales",
        ));
    }
    write_scales(&mut back[..scales.len()], &converted);
    Ok(())
}

/// A slot's data bytes and its scales, read from the buffer the slot lies in.
pub fn slot_contents<'a>(slot: &TensorSlot, buffer: &'a [u8]) -> Result<(&'a [u8], Vec<f32>)> {
    slot.check_in(buffer.len())?;
    Ok((
        &buffer[slot.data_range()],
        read_scales(&buffer[slot.scales_range()]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn repr(dtype: DType, quant: Quant) -> Repr {
        Repr { dtype, quant }
    }

    #[test]
    fn scales_follow_their_data_and_read_back_exactly() {
        // A 2x4 f32 tensor quantized per channel: 8 bytes of fp8, then 2 scales.
        let (slots, size) = layout([
            (8, 2, repr(DType::F8E4M3, Quant::PerChannel)),
            (3, 1, repr(DType::F32, Quant::None)),
        ]);
        let (fp8, plain) = (slots[0], slots[1]);
        assert_eq!((fp8.data_range(), fp8.scale_bytes()), (0..8, 8));
        assert!(fp8.scales_offset >= 8 && plain.offset >= fp8.scales_range().end);
        assert_eq!(size, crate::host::align_up(plain.data_range().end));
        let mut buffer = vec![0xAA; size];
        let values: Vec<u8> = [1.0f32, -2.0, 4.0, 8.0, 0.5, 0.25, -1.0, 2.0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let src = TensorBytes {
            bytes: &values,
            dtype: DType::F32,
            scales: &[],
        };
        convert_into_slot(src, &fp8, &mut buffer, Engine::default()).unwrap();
        let (data, scales) = slot_contents(&fp8, &buffer).unwrap();
        assert_eq!(data, &buffer[0..8]);
        // Each row's absmax maps to fp8's largest value, 448.
        assert_eq!(scales, vec![8.0 / 448.0, 2.0 / 448.0]);
        assert_eq!(read_scales(&scales_to_bytes(&scales)), scales);
        assert!(
            buffer[fp8.scales_range().end..plain.offset]
                .iter()
                .all(|&b| b == 0xAA),
            "padding untouched"
        );
    }

    #[test]
    fn slots_outside_their_buffer_or_into_their_scales_are_refused() {
        let (slots, size) = layout([(4, 1, repr(DType::F8E4M3, Quant::PerTensor))]);
        let slot = slots[0];
        assert!(slot.check_in(size).is_ok());
        assert!(slot.check_in(slot.scales_range().end - 1).is_err());
        let into_scales = TensorSlot {
            scales_offset: 2,
            ..slot
        };
        assert!(into_scales.check_in(size).is_err());
        // Unscaled, the scales' offset bounds nothing.
        let plain = TensorSlot {
            repr: repr(DType::F8E4M3, Quant::None),
            scales_offset: 0,
            ..slot
        };
        assert!(plain.check_in(4).is_ok());
        let mut buffer = vec![0; size];
        let src = TensorBytes {
            bytes: &[0; 16],
            dtype: DType::F32,
            scales: &[],
        };
        assert!(convert_into_slot(src, &slot, &mut buffer[..4], Engine::default()).is_err());
        assert!(slot_contents(&slot, &buffer[..4]).is_err());
    }

    #[test]
    fn parts_land_in_place_and_never_past_their_slot() {
        let (slots, size) = layout([(4, 1, repr(DType::BF16, Quant::None))]);
        let slot = slots[0];
        let mut buffer = vec![0; size];
        let part = [1.0f32.to_ne_bytes(), 2.0f32.to_ne_bytes()].concat();
        let src = || TensorBytes {
            bytes: &part,
            dtype: DType::F32,
            scales: &[],
        };
        convert_into_slot_part(src(), &slot, &mut buffer, 2, Engine::default()).unwrap();
        // bf16 1.0 and 2.0 as elements 2 and 3; elements 0 and 1 untouched.
        let expected = [0u16, 0, 0x3F80, 0x4000].map(u16::to_ne_bytes).concat();
        assert_eq!(&buffer[slot.data_range()], expected.as_slice());
        assert!(convert_into_slot_part(src(), &slot, &mut buffer, 3, Engine::default()).is_err());
        let scaled = TensorSlot {
            repr: repr(DType::F8E4M3, Quant::PerTensor),
            ..slot
        };
        assert!(scaled.check_part(size, 0, 1).is_err());
    }

    #[test]
    fn rows_scaled_per_row_convert_in_parts_to_the_bytes_of_the_whole() {
        // 5 rows of 3 bf16 values of every magnitude, quantized per row: whole, and in parts of
        // 2, 2 and 1 rows written in another order.
        let (slots, size) = layout([(15, 5, repr(DType::F8E4M3, Quant::PerChannel))]);
        let slot = slots[0];
        let values: Vec<u8> = (0..15u16)
            .flat_map(|i| (0x3C00u16 ^ (i * 0x1111)).to_le_bytes())
            .collect();
        let rows = |first: usize, count: usize| TensorBytes {
            bytes: &values[first * 6..(first + count) * 6],
            dtype: DType::BF16,
            scales: &[],
        };
        let mut whole = vec![0xAA; size];
        convert_into_slot(rows(0, 5), &slot, &mut whole, Engine::default()).unwrap();
        let mut parts = vec![0xAA; size];
        for (first, count) in [(4, 1), (0, 2), (2, 2)] {
            convert_into_slot_part(
                rows(first, count),
                &slot,
                &mut parts,
                first * 3,
                Engine::default(),
            )
            .unwrap();
        }
        assert_eq!(parts, whole);
        let (_, scales) = slot_contents(&slot, &parts).unwrap();
        assert!(scales.iter().all(|&s| s > 0.0) && scales.len() == 5);
        // Not whole rows, or one scale for the whole tensor: refused.
        let split_row = TensorBytes {
            bytes: &values[..4],
            ..rows(0, 1)
        };
        assert!(
            convert_into_slot_part(split_row, &slot, &mut parts, 0, Engine::default()).is_err()
        );
        assert!(
            convert_into_slot_part(rows(1, 1), &slot, &mut parts, 1, Engine::default()).is_err()
        );
        let per_tensor = TensorSlot {
            repr: repr(DType::F8E4M3, Quant::PerTensor),
            ..slot
        };
        assert!(!per_tensor.converts_in_parts());
        assert!(
            convert_into_slot_part(rows(0, 1), &per_tensor, &mut parts, 0, Engine::default())
                .is_err()
        );
        assert_eq!(parts, whole, "refused parts write nothing");
    }
}
