//! Conversions on the device, on the copy stream, with the PTX kernels of `kernels/convert.cu`:
//! casts, and absmax quantization into fp8 (bit for bit what the host makes); and the host
//! fallbacks: where a host tensor is quantized ([`QuantizeOn`]), and conversions no kernel makes
//! (from f64), done on the host and copied back.

use super::driver::{self, Function, Module};
use super::Shared;
use crate::convert::TensorBytes;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::CountedBuffer;
use crate::slot::{scales_to_bytes, slot_contents, write_scales, TensorSlot, SCALE_BYTES};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::sync::Arc;

/// The conversion kernels, generated from `kernels/convert.cu` by `scripts/gen-ptx.sh`.
pub(super) const PTX: &str = concat!(include_str!("../../../kernels/convert.ptx"), "\0");

/// The most threads an absmax launch runs (1024 blocks). Each thread merges its maximum into
/// its group's word with one atomic per group it touches in a tile, and per tensor all of them
/// hit one word: a few hundred thousand atomics cost little, one per element would not.
pub(super) const ABSMAX_THREADS: u64 = 1024 * 256;
/// Elements per thread in one tile of the absmax kernel (`STRATA_ABSMAX_STEPS` in
/// kernels/convert.cu): a launch needs a thread per this many elements, no more.
const ABSMAX_STEPS: u64 = 32;

/// The kernels of `kernels/convert.cu`, by the dtypes they read and write.
pub(super) struct Kernels {
    /// Plain conversions, by (source, destination): into f32/f16/bf16, and casts into fp8.
    convert: HashMap<(DType, DType), Function>,
    /// The absmax quantization's steps: `absmax` by source, `scales` by fp8 format, `quantize`
    /// by (source, fp8 format).
    clear: Function,
    absmax: HashMap<DType, Function>,
    scales: HashMap<DType, Function>,
    quantize: HashMap<(DType, DType), Function>,
}

impl Kernels {
    pub(super) fn load(module: &Module) -> Result<Kernels> {
        let mut kernels = Kernels {
            convert: HashMap::new(),
            clear: module.function("strata_absmax_clear")?,
            absmax: HashMap::new(),
            scales: HashMap::new(),
            quantize: HashMap::new(),
        };
        let sources = DType::floats()
            .iter()
            .filter_map(|&d| Some((d, kernel_dtype_name(d)?)));
        let targets = [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F8E4M3,
            DType::F8E5M2,
        ];
        for (src, from) in sources {
            for dst in targets {
                let to = kernel_dtype_name(dst).expect("a kernel dtype");
                // fp8 into itself is a cast of scaled data to plain.
                if src != dst || dst.is_fp8() {
                    let name = format!("strata_convert_{from}_to_{to}");
                    kernels.convert.insert((src, dst), module.function(&name)?);
                }
                if dst.is_fp8() {
                    let name = format!("strata_quantize_{from}_to_{to}");
                    kernels.quantize.insert((src, dst), module.function(&name)?);
                }
            }
            let absmax = module.function(&format!("strata_absmax_{from}"))?;
            kernels.absmax.insert(src, absmax);
            if src.is_fp8() {
                let scales = module.function(&format!("strata_scales_{from}"))?;
                kernels.scales.insert(src, scales);
            }
        }
        Ok(kernels)
    }
}

/// Where a tensor on the host that needs absmax quantization into fp8 is quantized: the one
/// choice of the upload path (every other conversion of a host tensor, a plain cast, costs the
/// host about a copy and crosses already converted).
///
/// The rule: **on the device whenever it can be**, that is when a kernel reads the source dtype
/// (f32, f16, bf16, fp8; not f64) and the budget leaves device memory unused for the source's
/// bytes beside what is live and pooled (or a pooled buffer of that size is free): the source
/// then crosses in its own dtype into that scratch memory, and the kernels quantize it into the
/// slot. Otherwise host threads quantize it and fp8 crosses. `STRATA_CUDA_QUANTIZE=host` makes
/// every such upload quantize on the host.
///
/// Why: on the host, quantization costs CPU time for every byte (two passes, a division per
/// element: 0.44 GB/s on one core before vectorising, issue 20), while the GPU quantizes at
/// memory speed; on the device it costs bus bytes: a bf16 source crosses as 2 bytes per
/// parameter instead of 1. With the bus at B bytes/s and the host quantizing H parameters/s,
/// the host path moves min(H, B) parameters/s and the device path B / 2 (B / 4 from f32): the
/// device path is slower only when the host quantizes faster than B / 2, 12.5 G parameters/s
/// on PCIe Gen4, which no host reaches on the cores a framework leaves free; and it leaves those
/// cores alone. The host path remains where device memory is what is short: the scratch never
/// takes budget the layers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QuantizeOn {
    /// On the device where a kernel and device memory allow it (the default).
    Device,
    /// Always on the host (`STRATA_CUDA_QUANTIZE=host`).
    Host,
}

impl QuantizeOn {
    /// The rule as `STRATA_CUDA_QUANTIZE` sets it: "host" or "device" (the default when unset);
    /// Err with the value otherwise.
    pub(super) fn from_setting(setting: Option<&str>) -> std::result::Result<QuantizeOn, String> {
        match setting.map(str::trim) {
            None | Some("") | Some("device") => Ok(QuantizeOn::Device),
            Some("host") => Ok(QuantizeOn::Host),
            Some(other) => Err(other.to_string()),
        }
    }
}

/// A tensor's data (and fp8 scales, 0 when unscaled) in device memory.
pub(super) struct DeviceTensor {
    data: u64,
    dtype: DType,
    numel: usize,
    scales: u64,
    scale_count: usize,
}

pub(super) fn kernel_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F8E4M3 => "f8e4m3",
        DType::F8E5M2 => "f8e5m2",
        _ => return None,
    })
}

/// The stream whose work so far includes a conversion's last write.
pub(super) enum WrittenOn {
    CopyStream,
    ConvertStream,
}

impl Shared {
    /// Makes the convert stream wait for the work enqueued on the copy stream so far; returns it.
    pub(super) fn convert_stream_after_copies(&self) -> Result<sys::CUstream> {
        let side = self.res().convert_stream.0;
        // Waits already enqueued on an event keep the point it marked when it is recorded
        // again, so it goes back to the spares at once.
        let copied = self.event()?;
        let waited = copied
            .record(self.res().stream.0)
            .and_then(|()| copied.make_wait(side));
        self.recycle([copied]);
        waited.map(|()| side)
    }

    /// Enqueues the conversion of the tensor at `src_slot` in the device buffer at `src` into
    /// `dst_slot` in the buffer at `dst`: a device-to-device copy when the forms agree, a kernel
    /// where one reads the source dtype, else a round trip through the host (from f64). A plain
    /// conversion kernel runs on the convert stream, after the copy stream's work so far; the
    /// rest on the copy stream. Call with the context bound, and slots checked to lie in their
    /// buffers and to hold the same shape.
    pub(super) fn convert(
        &self,
        src: u64,
        src_slot: &TensorSlot,
        dst: u64,
        dst_slot: &TensorSlot,
    ) -> Result<WrittenOn> {
        let stream = self.res().stream.0;
        let (from, to) = (src_slot.repr.dtype, dst_slot.repr.dtype);
        let scale_count = src_slot.scale_count();
        if from == to && scale_count == dst_slot.scale_count() {
            driver::copy_on_device(
                dst + dst_slot.offset as u64,
                src + src_slot.offset as u64,
                src_slot.data_bytes(),
                stream,
            )?;
            if scale_count > 0 {
                driver::copy_on_device(
                    dst + dst_slot.scales_offset as u64,
                    src + src_slot.scales_offset as u64,
                    src_slot.scale_bytes(),
                    stream,
                )?;
            }
        } else if dst_slot.scale_count() > 0 && self.quantizes(from) {
            let source = DeviceTensor {
                data: src + src_slot.offset as u64,
                dtype: from,
                numel: src_slot.numel,
                scales: match scale_count {
                    0 => 0,
                    _ => src + src_slot.scales_offset as u64,
                },
                scale_count,
            };
            let (data, scales) = (
                dst + dst_slot.offset as u64,
                dst + dst_slot.scales_offset as u64,
            );
            self.quantize(&source, data, scales, to, dst_slot.scale_count(), stream)?;
        } else if let Some(&kernel) = self.res().kernels.convert.get(&(from, to)) {
            if dst_slot.scale_count() != 0 {
                return Err(Error::invalid("a kernel target is never scaled"));
            }
            let numel = src_slot.numel as u64;
            if numel > 0 {
                let scales = match scale_count {
                    0 => 0,
                    _ => src + src_slot.scales_offset as u64,
                };
                let row_len = numel / scale_count.max(1) as u64;
                let mut params = [
                    src + src_slot.offset as u64,
                    dst + dst_slot.offset as u64,
                    scales,
                    numel,
                    row_len,
                ];
                // The source's fill and the waits that freed `dst` for reuse are on the copy
                // stream before this point.
                let side = self.convert_stream_after_copies()?;
                driver::launch(kernel, numel, side, &mut params)?;
                return Ok(WrittenOn::ConvertStream);
            }
        } else {
            // A dtype no kernel reads (f64): through the host, after the copies that filled the
            // source have landed (the copies out wait for them on the stream).
            let stream = &self.res().stream;
            // The tensor alone on the host, its scales right after it, counted in host_limit.
            let local = TensorSlot {
                offset: 0,
                scales_offset: src_slot.data_bytes(),
                ..*src_slot
            };
            let mut host =
                CountedBuffer::new(local.scales_offset + local.scale_bytes(), &self.res().host)?;
            let (data, scales) = host.buffer.as_mut_slice().split_at_mut(local.scales_offset);
            stream.copy_to_host(data, src + src_slot.offset as u64)?;
            stream.copy_to_host(scales, src + src_slot.scales_offset as u64)?;
            let (data, scales) = slot_contents(&local, host.buffer.as_slice())?;
            let source = TensorBytes {
                bytes: data,
                dtype: from,
                scales: &scales,
            };
            let converted = self.converted_on_host(source, dst_slot)?;
            let (data, scales) = converted.buffer.as_slice().split_at(dst_slot.data_bytes());
            self.push(data, dst + dst_slot.offset as u64)?;
            self.push(scales, dst + dst_slot.scales_offset as u64)?;
        }
        Ok(WrittenOn::CopyStream)
    }

    /// Enqueues on `stream` the absmax quantization of `src` (device memory) into `dst`, fp8
    /// `dst_dtype`, with one scale per `groups` equal groups written at `dst_scales`: what
    /// `crate::convert::convert` makes on the host, bit for bit (see kernels/convert.cu). Call
    /// with the context bound and a kernel for `src.dtype` (see `quantizes`).
    pub(super) fn quantize(
        &self,
        src: &DeviceTensor,
        dst: u64,
        dst_scales: u64,
        dst_dtype: DType,
        groups: usize,
        stream: sys::CUstream,
    ) -> Result<()> {
        let kernels = &self.res().kernels;
        let missing = || {
            Error::invalid(format!(
                "no kernel quantizes {:?} into {dst_dtype:?}",
                src.dtype
            ))
        };
        let absmax = *kernels.absmax.get(&src.dtype).ok_or_else(missing)?;
        let scales = *kernels.scales.get(&dst_dtype).ok_or_else(missing)?;
        let quantize = *kernels
            .quantize
            .get(&(src.dtype, dst_dtype))
            .ok_or_else(missing)?;
        if groups == 0 {
            return Ok(());
        }
        let numel = src.numel as u64;
        let row_len = numel / groups as u64;
        let src_row_len = numel.checked_div(src.scale_count as u64).unwrap_or(0);
        let groups = groups as u64;
        driver::launch(kernels.clear, groups, stream, &mut [dst_scales, groups])?;
        if numel > 0 {
            let mut params = [
                src.data,
                src.scales,
                dst_scales,
                numel,
                src_row_len,
                row_len,
            ];
            let threads = numel.div_ceil(ABSMAX_STEPS).min(ABSMAX_THREADS);
            driver::launch(absmax, threads, stream, &mut params)?;
        }
        driver::launch(scales, groups, stream, &mut [dst_scales, groups])?;
        if numel > 0 {
            let mut params = [
                src.data,
                src.scales,
                dst,
                dst_scales,
                numel,
                src_row_len,
                row_len,
            ];
            driver::launch(quantize, numel, stream, &mut params)?;
        }
        Ok(())
    }

    /// Whether the kernels quantize `dtype` (every float dtype but f64).
    pub(super) fn quantizes(&self, dtype: DType) -> bool {
        self.res().kernels.absmax.contains_key(&dtype)
    }

    /// Uploads host `src` into `slot` (scaled fp8) and quantizes it there, when the rule at
    /// [`QuantizeOn`] says so; false when the host is to quantize it instead.
    pub(super) fn quantized_on_device(
        self: &Arc<Self>,
        src: TensorBytes<'_>,
        dst: u64,
        slot: &TensorSlot,
    ) -> Result<bool> {
        let groups = slot.scale_count();
        let numel = slot.numel;
        // Anything the host conversion would refuse goes there, for its message.
        let well_formed = src.bytes.len() == numel * src.dtype.size()
            && numel.is_multiple_of(groups.max(1))
            && match src.scales.len() {
                0 => true,
                n => src.dtype.is_fp8() && (n == 1 || n == slot.rows),
            };
        if self.res().quantize_uploads == QuantizeOn::Host
            || groups == 0
            || numel == 0
            || !well_formed
            || !self.quantizes(src.dtype)
        {
            return Ok(false);
        }
        let scales_at = crate::host::align_up(src.bytes.len());
        let Some(scratch) = self.scratch(scales_at + src.scales.len() * SCALE_BYTES)? else {
            return Ok(false);
        };
        self.push(src.bytes, scratch.pointer)?;
        self.push(
            &scales_to_bytes(src.scales),
            scratch.pointer + scales_at as u64,
        )?;
        let tensor = DeviceTensor {
            data: scratch.pointer,
            dtype: src.dtype,
            numel,
            scales: match src.scales.len() {
                0 => 0,
                _ => scratch.pointer + scales_at as u64,
            },
            scale_count: src.scales.len(),
        };
        let (data, scales) = (dst + slot.offset as u64, dst + slot.scales_offset as u64);
        // On the convert stream, after the pushes: the copy engine goes on with the next upload.
        let side = self.convert_stream_after_copies()?;
        self.quantize(&tensor, data, scales, slot.repr.dtype, groups, side)?;
        // The scratch goes back to the pool, written again only after these kernels read it.
        scratch.used_until(side as usize)?;
        Ok(true)
    }

    /// Host bytes the same size as `slot`'s data and scales, converted from `src` on the host:
    /// for uploads into another dtype (see `QuantizeOn`), and the conversions no kernel makes
    /// (from f64).
    pub(super) fn converted_on_host(
        &self,
        src: TensorBytes<'_>,
        slot: &TensorSlot,
    ) -> Result<CountedBuffer> {
        let data = slot.data_bytes();
        let mut out = CountedBuffer::staging(data + slot.scale_bytes(), &self.res().host)?;
        let (bytes, scale_bytes) = out.buffer.as_mut_slice().split_at_mut(data);
        let scales = crate::convert::convert_with(
            src,
            slot.rows,
            bytes,
            slot.repr.dtype,
            slot.repr.quant,
            self.res().conversions,
        )?;
        write_scales(scale_bytes, &scales);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::QuantizeOn;

    #[test]
    fn strata_cuda_quantize_chooses_where_uploads_quantize() {
        assert_eq!(QuantizeOn::from_setting(None), Ok(QuantizeOn::Device));
        assert_eq!(QuantizeOn::from_setting(Some("")), Ok(QuantizeOn::Device));
        assert_eq!(
            QuantizeOn::from_setting(Some("device")),
            Ok(QuantizeOn::Device)
        );
        assert_eq!(
            QuantizeOn::from_setting(Some(" host\n")),
            Ok(QuantizeOn::Host)
        );
        assert_eq!(
            QuantizeOn::from_setting(Some("gpu")),
            Err("gpu".to_string())
        );
    }
}
