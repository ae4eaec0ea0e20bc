//! Groups: sets of layers that share a tier configuration and are onloaded and offloaded together.

use super::consts::strata_status;
use super::context::{context, strata_context};
use super::{boundary, boundary_value, out_arg, read_sized, str_arg, Versioned};
use crate::convert::Quant;
use crate::dtype::DType;
use crate::error::Result;
use crate::registry::GroupId;
use crate::tiers::{Device, Placement, Tiers};

/// Where a tier keeps a layer: a STRATA_DEVICE_* and a STRATA_DTYPE_*. Zeroed means "the usual
/// place, the stored dtype". STRATA_DTYPE_SOURCE on the onload and preparing tiers keeps the form
/// of the tier before (so storing fp8 at offload keeps it fp8 until computation); on the offload
/// and computation tiers it means the stored dtype. On STRATA_DEVICE_DISK the bytes are the file's own, so the dtype
/// there is the stored one whatever is written here: strata never writes a second copy to disk.
/// A tier's dtype is a float one or SOURCE: integer tensors keep their stored dtype everywhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strata_placement {
    pub device: u32,
    pub dtype: u32,
}

/// The four tiers of a group. Start from `strata_tiers_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strata_tiers {
    /// sizeof(strata_tiers).
    pub struct_size: u32,
    /// Where layers live while their group is offloaded: disk or cpu.
    pub offload: strata_placement,
    /// Where layers live while their group is onloaded: disk or cpu.
    pub onload: strata_placement,
    /// Where layers stay resident between uses while the budget allows: the compute device.
    pub preparing: strata_placement,
    /// What strata_acquire_for_compute hands out: the compute device.
    pub computation: strata_placement,
    /// fp8 storage of tensors with 2+ dimensions: STRATA_QUANT_NONE, _PER_TENSOR or _PER_CHANNEL.
    pub quantization: u32,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_tiers {
    const FIRST_RELEASED_SIZE: usize = std::mem::size_of::<strata_tiers>();
}

/// All four placements DEFAULT with dtype SOURCE, quantization NONE.
#[no_mangle]
pub extern "C" fn strata_tiers_default() -> strata_tiers {
    boundary_value("strata_tiers_default", default_tiers(), default_tiers)
}

fn default_tiers() -> strata_tiers {
    strata_tiers {
        struct_size: std::mem::size_of::<strata_tiers>() as u32,
        offload: strata_placement::default(),
        onload: strata_placement::default(),
        preparing: strata_placement::default(),
        computation: strata_placement::default(),
        quantization: 0,
    }
}

/// The caller's numbers as tiers, with `STRATA_DEVICE_DEFAULT` resolved for a context computing
/// on `compute` (the cpu for offload and onload, `compute` for preparing and computation).
fn tiers_from(raw: &strata_tiers, compute: Device) -> Result<Tiers> {
    let names = ["offload", "onload", "preparing", "computation"];
    let raw_placements = [raw.offload, raw.onload, raw.preparing, raw.computation];
    let mut placements = [Placement {
        device: Device::Cpu,
        dtype: None,
    }; 4];
    for (i, (tier, raw)) in names.into_iter().zip(raw_placements).enumerate() {
        let in_tier = |e: crate::error::Error| e.context(format!("{tier} tier"));
        let dtype = DType::from_abi(raw.dtype).map_err(in_tier)?;
        let device = Device::from_abi(raw.device).map_err(in_tier)?;
        let usual = if i < 2 { Device::Cpu } else { compute };
        placements[i] = Placement {
            device: device.unwrap_or(usual),
            dtype,
        };
    }
    let [offload, onload, preparing, computation] = placements;
    Ok(Tiers {
        offload,
        onload,
        preparing,
        computation,
        quant: Quant::from_abi(raw.quantization)?,
    })
}

/// Creates a group (initially offloaded) and writes its id to `group_out`: an id no other group or
/// layer, of any context, ever had or will have in this process.
#[no_mangle]
pub extern "C" fn strata_group_create(
    ctx: *mut strata_context,
    name: *const std::ffi::c_char,
    tiers: *const strata_tiers,
    group_out: *mut u64,
) -> strata_status {
    boundary("strata_group_create", || {
        let ctx = context(ctx)?;
        let name = str_arg(name, "name")?;
        let tiers = read_sized(tiers, "tiers", default_tiers())?;
        let out = out_arg(group_out, "group_out")?;
        let tiers = tiers_from(&tiers, ctx.options().compute)?;
        *out = ctx.create_group(name, &tiers)?.0;
        Ok(())
    })
}

/// Moves a group's layers to their onload tier (reading into RAM where the onload tier is the cpu).
/// A layer whose copy cannot be made (its file damaged, host memory short) does not stop the
/// others: they are onloaded, the first such error is returned, and each failed layer tries again
/// at its own acquire. From the progress callback of this group's onload, STRATA_ERR_STATE at once
/// (as are strata_group_offload and strata_group_destroy of it there).
#[no_mangle]
pub extern "C" fn strata_group_onload(ctx: *mut strata_context, group: u64) -> strata_status {
    boundary("strata_group_onload", || {
        context(ctx)?.onload_group(GroupId(group))
    })
}

/// Moves a group's layers back to their offload tier: resident copies leave the device (layers in
/// use leave when released). Waits for fills of its layers to end; a group destroyed meanwhile by
/// another thread is STRATA_ERR_INVALID_HANDLE.
#[no_mangle]
pub extern "C" fn strata_group_offload(ctx: *mut strata_context, group: u64) -> strata_status {
    boundary("strata_group_offload", || {
        context(ctx)?.offload_group(GroupId(group))
    })
}

/// Destroys a group and its layers. STRATA_ERR_STATE while any of its layers is acquired, or while
/// an onload of it runs. A group another thread destroys while this call waits: INVALID_HANDLE.
#[no_mangle]
pub extern "C" fn strata_group_destroy(ctx: *mut strata_context, group: u64) -> strata_status {
    boundary("strata_group_destroy", || {
        context(ctx)?.destroy_group(GroupId(group))
    })
}
