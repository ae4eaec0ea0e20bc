//! Registering layers: from host tensors (copied into the offload form), from a checkpoint by
//! tensor names or by prefix; finding and unregistering them.

use super::{conversions, Context, HostTensorIn, State};
use crate::checkpoint::Checkpoint;
use crate::convert::TensorBytes;
use crate::error::{Error, Result};
use crate::host::CountedBuffer;
use crate::registry::{
    Forms, GroupId, HostBytes, HostCopy, Key, Layer, LayerId, Layout, TensorMeta,
};
use crate::residency::OnDevice;
use crate::slot::convert_into_slot;
use crate::tiers::{Device, Tiers};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl Context {
    /// Checks that `group` exists and `name` is free; returns the group and its tiers.
    pub(super) fn check_new_layer(
        &self,
        st: &State,
        group: GroupId,
        name: &str,
    ) -> Result<(Key, Tiers)> {
        let key = self.group_key(st, group)?;
        if st.registry.layer_names.contains_key(name) {
            return Err(Error::invalid(format!(
                "a layer named {name:?} is already registered"
            )));
        }
        Ok((key, st.registry.groups.get(key).expect("checked").tiers))
    }

    pub(super) fn insert_layer(&self, st: &mut State, layer: Layer) -> Result<LayerId> {
        if st.registry.layer_names.contains_key(&*layer.name) {
            return Err(Error::invalid(format!(
                "a layer named {:?} is already registered",
                layer.name
            )));
        }
        let group = layer.group;
        let name = layer.name.clone();
        let key = st.registry.layers.insert(layer);
        st.registry.layer_names.insert(name.to_string(), key);
        let group = st
            .registry
            .groups
            .get_mut(group)
            .expect("checked by caller");
        group.layers.insert(key.id(), key);
        // The group's onload made copies for the layers it had; this one has none yet. The next
        // acquire onloads again (only this layer has work to do) rather than reading around the
        // onload tier from the offload one.
        group.onloaded = false;
        Ok(LayerId(key.id()))
    }

    pub(super) fn new_layer(
        &self,
        name: &str,
        group: Key,
        tiers: &Tiers,
        tensors: Vec<TensorMeta>,
    ) -> Result<Layer> {
        if tensors.is_empty() {
            return Err(Error::invalid(format!("layer {name:?} has no tensors")));
        }
        let mut seen = HashSet::with_capacity(tensors.len());
        if let Some(twice) = tensors.iter().find(|t| !seen.insert(&t.name)) {
            return Err(Error::invalid(format!(
                "layer {name:?} lists tensor {:?} twice",
                twice.name
            )));
        }
        Ok(Layer {
            name: name.into(),
            forms: Forms::new(&tensors, tiers, self.backend.footprint()),
            group,
            tensors: tensors.into(),
            checkpoint: None,
            offload_copy: None,
            onload_copy: None,
            device: OnDevice::default(),
            copying_host: false,
        })
    }

    /// Registers a layer from host tensors; their bytes are copied into the offload tier's form.
    pub fn register_host(
        &self,
        group: GroupId,
        name: &str,
        tensors: &[HostTensorIn<'_>],
    ) -> Result<LayerId> {
        let (group_key, tiers) = self.check_new_layer(&self.lock(), group, name)?;
        if tiers.offload.device == Device::Disk || tiers.onload.device == Device::Disk {
            return Err(Error::invalid(
                "host tensors have no file behind them: register them in a group whose offload and onload tiers are on the cpu",
            ));
        }
        let mut metas = Vec::with_capacity(tensors.len());
        for t in tensors {
            let meta = TensorMeta::new(t.name, t.dtype, t.shape.clone())?;
            if t.data.len() != meta.nbytes() {
                return Err(Error::invalid(format!(
                    "tensor {:?}: {} bytes given, its dtype and shape need {}",
                    t.name,
                    t.data.len(),
                    meta.nbytes()
                )));
            }
            metas.push(meta);
        }
        let mut layer = self.new_layer(name, group_key, &tiers, metas)?;
        let Layout { slots, size } = layer.forms.offload.clone();
        let mut buffer = CountedBuffer::new(size, &self.host)?;
        for (t, slot) in tensors.iter().zip(&slots) {
            let src = TensorBytes {
                bytes: t.data,
                dtype: t.dtype,
                scales: &[],
            };
            convert_into_slot(
                src,
                slot,
                buffer.buffer.as_mut_slice(),
                conversions(&self.options),
            )?;
        }
        layer.offload_copy = Some(Arc::new(HostCopy {
            _pinned: self.backend.pin_host(buffer.buffer.as_slice()),
            buffer: HostBytes::Own(buffer),
            slots,
        }));
        let mut st = self.lock();
        self.group_key(&st, group)?;
        self.insert_layer(&mut st, layer)
    }

    /// Registers a layer whose tensors stay in `checkpoint` until a tier needs them.
    pub fn register_checkpoint(
        &self,
        group: GroupId,
        checkpoint: &Checkpoint,
        name: &str,
        tensor_names: &[&str],
    ) -> Result<LayerId> {
        let layer = {
            let st = self.lock();
            let (key, tiers) = self.check_new_layer(&st, group, name)?;
            self.checkpoint_layer(checkpoint, key, &tiers, name, tensor_names)?
        };
        let mut st = self.lock();
        self.group_key(&st, group)?;
        self.insert_layer(&mut st, layer)
    }

    /// Registers every tensor under `prefix`, grouped into layers by name (see `layer_name_of`).
    /// All or nothing: a name clash registers no layer. Returns the number of layers.
    pub fn register_checkpoint_prefix(
        &self,
        group: GroupId,
        checkpoint: &Checkpoint,
        prefix: &str,
        keep_components: u32,
    ) -> Result<usize> {
        // Layers in the order their first tensor comes; found by name through `position`, so a
        // checkpoint of many layers takes linear time, not a scan of the layers per tensor.
        let mut layers: Vec<(String, Vec<&str>)> = Vec::new();
        let mut position: HashMap<String, usize> = HashMap::new();
        for info in checkpoint.tensors() {
            if info.name.starts_with(prefix) {
                let layer = layer_name_of(&info.name, keep_components);
                match position.get(&layer) {
                    Some(&at) => layers[at].1.push(&info.name),
                    None => {
                        position.insert(layer.clone(), layers.len());
                        layers.push((layer, vec![&info.name]));
                    }
                }
            }
        }
        if layers.is_empty() {
            return Err(Error::not_found(format!(
                "no tensor name starts with {prefix:?}"
            )));
        }
        let mut st = self.lock();
        let mut built = Vec::with_capacity(layers.len());
        for (name, tensors) in &layers {
            let (key, tiers) = self.check_new_layer(&st, group, name)?;
            built.push(self.checkpoint_layer(checkpoint, key, &tiers, name, tensors)?);
        }
        for layer in built {
            self.insert_layer(&mut st, layer)?;
        }
        Ok(layers.len())
    }

    pub fn find_layer(&self, name: &str) -> Result<LayerId> {
        let st = self.lock();
        st.registry
            .layer_names
            .get(name)
            .map(|&key| LayerId(key.id()))
            .ok_or_else(|| Error::not_found(format!("no layer named {name:?}")))
    }

    pub(super) fn layer_key(&self, st: &State, id: LayerId) -> Result<Key> {
        st.registry.layers.key(id.0).ok_or_else(|| {
            Error::handle(format!(
                "layer id {id:#x} is not a layer of this context (unregistered, never registered, or another context's)"
            ))
        })
    }

    pub fn tensor_count(&self, id: LayerId) -> Result<usize> {
        let st = self.lock();
        let key = self.layer_key(&st, id)?;
        Ok(st.registry.layers.get(key).expect("checked").tensors.len())
    }

    pub fn unregister_layer(&self, id: LayerId) -> Result<()> {
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        // As in destroy_group: a fill (a prefetch the caller cannot see) ends on its own.
        while st.registry.layers.get(key).is_some_and(|l| l.busy()) {
            st = self.wait(st)?;
        }
        let key = self.layer_key(&st, id)?;
        let layer = st.registry.layers.get(key).expect("checked");
        if layer.device.in_use().is_some() {
            return Err(Error::state(format!(
                "layer {:?} is in use; release it first",
                layer.name
            )));
        }
        self.remove_layer(&mut st, key);
        Ok(())
    }

    pub(super) fn remove_layer(&self, st: &mut State, key: Key) {
        if let Some(mut layer) = st.registry.layers.remove(key) {
            st.registry.layer_names.remove(&*layer.name);
            if let Some(group) = st.registry.groups.get_mut(layer.group) {
                group.layers.remove(&key.id());
            }
            st.budget.refund(layer.device.evict());
            st.schedule.forget(key);
            st.window.remove(key);
        }
        self.wake(st.waiters);
    }

    fn checkpoint_layer(
        &self,
        checkpoint: &Checkpoint,
        group: Key,
        tiers: &Tiers,
        name: &str,
        tensor_names: &[&str],
    ) -> Result<Layer> {
        let mut infos = Vec::with_capacity(tensor_names.len());
        let mut metas = Vec::with_capacity(tensor_names.len());
        for &tensor in tensor_names {
            let info = checkpoint.tensor(tensor).ok_or_else(|| {
                Error::not_found(format!("the checkpoint has no tensor {tensor:?}"))
            })?;
            let dtype = info.dtype.ok_or_else(|| {
                Error::unsupported(format!(
                    "tensor {tensor:?} has dtype {}, which strata does not handle",
                    info.dtype_name
                ))
            })?;
            let shape = info
                .shape
                .iter()
                .map(|&d| {
                    i64::try_from(d).map_err(|_| {
                        Error::format(format!("tensor {tensor:?} has a dimension too large"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            metas.push(TensorMeta::new(tensor, dtype, shape)?);
            infos.push(info.clone());
        }
        let mut layer = self.new_layer(name, group, tiers, metas)?;
        layer.checkpoint = Some(infos.into());
        Ok(layer)
    }
}

/// The layer a tensor belongs to: its name cut to the first `keep` dot-separated parts, or with only
/// its last part dropped when `keep` is 0 (or the name has no more than `keep` parts).
pub fn layer_name_of(tensor: &str, keep: u32) -> String {
    let parts: Vec<&str> = tensor.split('.').collect();
    let drop_last = parts.len().saturating_sub(1).max(1);
    let take = if keep == 0 {
        drop_last
    } else {
        (keep as usize).min(drop_last)
    };
    parts[..take].join(".")
}

#[cfg(test)]
mod tests {
    use super::layer_name_of;

    #[test]
    pub(super) fn layer_names_follow_keep_components() {
        assert_eq!(
            layer_name_of("blocks.3.attn.to_q.weight", 0),
            "blocks.3.attn.to_q"
        );
        assert_eq!(
            layer_name_of("blocks.3.attn.to_q.bias", 0),
            "blocks.3.attn.to_q"
        );
        assert_eq!(layer_name_of("blocks.3.attn.to_q.weight", 2), "blocks.3");
        assert_eq!(layer_name_of("norm.weight", 2), "norm");
        assert_eq!(layer_name_of("scale", 0), "scale");
        assert_eq!(layer_name_of("scale", 3), "scale");
    }
}
