//! Layers: the unit of acquire and release, registered from host tensors or a checkpoint.

use super::checkpoint::{checkpoint, strata_checkpoint};
use super::consts::strata_status;
use super::context::{context, strata_context};
use super::{boundary, out_arg, slice_arg, str_arg};
use crate::context::HostTensorIn;
use crate::dtype::DType;
use crate::error::Error;
use crate::registry::{GroupId, LayerId};
use std::ffi::{c_char, c_void};

/// A tensor in the caller's memory, for strata_layer_register_host.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strata_host_tensor {
    pub name: *const c_char,
    /// A STRATA_DTYPE_* other than SOURCE.
    pub dtype: u32,
    pub ndim: u32,
    pub shape: *const i64,
    /// numel * dtype size bytes; copied during the call.
    pub data: *const c_void,
}

/// Registers a layer from `n` host tensors. Their bytes are copied (into the offload tier's dtype),
/// so the caller may free them once this returns.
#[no_mangle]
pub extern "C" fn strata_layer_register_host(
    ctx: *mut strata_context,
    group: u64,
    layer_name: *const c_char,
    tensors: *const strata_host_tensor,
    n: usize,
    layer_out: *mut u64,
) -> strata_status {
    boundary("strata_layer_register_host", || {
        let ctx = context(ctx)?;
        let name = str_arg(layer_name, "layer_name")?;
        let raw = slice_arg(tensors, n, "tensors")?;
        let out = out_arg(layer_out, "layer_out")?;
        let mut inputs = Vec::with_capacity(raw.len());
        for (i, t) in raw.iter().enumerate() {
            let tensor_name = str_arg(t.name, &format!("tensors[{i}].name"))?;
            let dtype = DType::from_abi_concrete(t.dtype)
                .map_err(|e| e.context(format!("tensor {tensor_name:?}")))?;
            if t.ndim as usize > super::consts::STRATA_MAX_DIMS {
                return Err(Error::invalid(format!(
                    "tensor {tensor_name:?} has {} dimensions; at most {} are supported",
                    t.ndim,
                    super::consts::STRATA_MAX_DIMS
                )));
            }
            let shape =
                slice_arg(t.shape, t.ndim as usize, &format!("tensors[{i}].shape"))?.to_vec();
            let meta = crate::registry::TensorMeta::new(tensor_name, dtype, shape.clone())?;
            let data = slice_arg(
                t.data as *const u8,
                meta.nbytes(),
                &format!("tensors[{i}].data"),
            )?;
            inputs.push(HostTensorIn {
                name: tensor_name,
                dtype,
                shape,
                data,
            });
        }
        *out = ctx.register_host(GroupId(group), name, &inputs)?.0;
        Ok(())
    })
}

/// Registers a layer made of the named tensors of an open checkpoint. Nothing is read yet.
#[no_mangle]
pub extern "C" fn strata_layer_register_checkpoint(
    ctx: *mut strata_context,
    group: u64,
    ckpt: *mut strata_checkpoint,
    layer_name: *const c_char,
    tensor_names: *const *const c_char,
    n: usize,
    layer_out: *mut u64,
) -> strata_status {
    boundary("strata_layer_register_checkpoint", || {
        let ctx = context(ctx)?;
        let ckpt = checkpoint(ckpt)?;
        let name = str_arg(layer_name, "layer_name")?;
        let names = slice_arg(tensor_names, n, "tensor_names")?
            .iter()
            .enumerate()
            .map(|(i, &p)| str_arg(p, &format!("tensor_names[{i}]")))
            .collect::<crate::error::Result<Vec<_>>>()?;
        let out = out_arg(layer_out, "layer_out")?;
        *out = ctx
            .register_checkpoint(GroupId(group), &ckpt, name, &names)?
            .0;
        Ok(())
    })
}

/// Registers every tensor whose name starts with `prefix`, grouped into layers: a layer's name is
/// the tensor's name cut to its first `keep_components` dot-separated parts (0: drop only the last
/// part, so "blocks.3.attn.to_q.weight" and "...bias" form layer "blocks.3.attn.to_q"; 2: layer
/// "blocks.3"). All or nothing. Writes the number of layers to `n_layers_out`.
#[no_mangle]
pub extern "C" fn strata_group_register_checkpoint(
    ctx: *mut strata_context,
    group: u64,
    ckpt: *mut strata_checkpoint,
    prefix: *const c_char,
    keep_components: u32,
    n_layers_out: *mut usize,
) -> strata_status {
    boundary("strata_group_register_checkpoint", || {
        let ctx = context(ctx)?;
        let ckpt = checkpoint(ckpt)?;
        let prefix = str_arg(prefix, "prefix")?;
        let out = out_arg(n_layers_out, "n_layers_out")?;
        *out = ctx.register_checkpoint_prefix(GroupId(group), &ckpt, prefix, keep_components)?;
        Ok(())
    })
}

/// Looks a layer up by name.
#[no_mangle]
pub extern "C" fn strata_layer_find(
    ctx: *mut strata_context,
    layer_name: *const c_char,
    layer_out: *mut u64,
) -> strata_status {
    boundary("strata_layer_find", || {
        let ctx = context(ctx)?;
        let name = str_arg(layer_name, "layer_name")?;
        let out = out_arg(layer_out, "layer_out")?;
        *out = ctx.find_layer(name)?.0;
        Ok(())
    })
}

/// The number of tensors in a layer: the capacity strata_acquire_for_compute needs.
#[no_mangle]
pub extern "C" fn strata_layer_tensor_count(
    ctx: *mut strata_context,
    layer: u64,
    count_out: *mut usize,
) -> strata_status {
    boundary("strata_layer_tensor_count", || {
        let ctx = context(ctx)?;
        let out = out_arg(count_out, "count_out")?;
        *out = ctx.tensor_count(LayerId(layer))?;
        Ok(())
    })
}

/// Removes a layer; its id becomes invalid. STRATA_ERR_STATE while it is acquired.
#[no_mangle]
pub extern "C" fn strata_layer_unregister(ctx: *mut strata_context, layer: u64) -> strata_status {
    boundary("strata_layer_unregister", || {
        context(ctx)?.unregister_layer(LayerId(layer))
    })
}
