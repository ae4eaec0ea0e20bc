//! Devices, placements and the four tiers of a group, and the rules a context checks them by
//! (the C ABI resolves its DEFAULT device before: `ffi::group`).

use crate::convert::Quant;
use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Disk,
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Disk => "disk",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// Where a tier keeps a layer, and in which dtype (`None`: the stored dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    pub dtype: Option<DType>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Offload,
    Onload,
    Preparing,
    Computation,
}

/// The tiers of a group, with every `DEFAULT` already resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiers {
    pub offload: Placement,
    pub onload: Placement,
    pub preparing: Placement,
    pub computation: Placement,
    pub quant: Quant,
}

/// How one tensor is represented in one tier: its dtype, and how it is scaled if fp8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub dtype: DType,
    /// `Quant::None` unless the tensor is stored as scaled fp8 in this tier.
    pub quant: Quant,
}

impl Repr {
    /// Number of f32 scales kept beside the data.
    pub fn scale_count(self, rows: usize) -> usize {
        match self.quant {
            Quant::None => 0,
            Quant::PerTensor => 1,
            Quant::PerChannel => rows,
        }
    }
}

impl Tiers {
    /// Refuses tiers a context computing on `compute` cannot keep: a tier dtype that is not a
    /// float one, a host tier (offload, onload) off the disk and the cpu, a device tier
    /// (preparing, computation) off `compute`, an onload tier on disk below an offload on the cpu.
    pub fn check(&self, compute: Device) -> Result<()> {
        let names = ["offload", "onload", "preparing", "computation"];
        let placements = [self.offload, self.onload, self.preparing, self.computation];
        for (i, (tier, placement)) in names.into_iter().zip(placements).enumerate() {
            if let Some(dtype) = placement.dtype.filter(|d| !d.is_float()) {
                // Integer tensors keep their stored dtype in every tier; an integer tier dtype
                // would ask for float tensors to be cast to integers, which strata does not do.
                return Err(Error::invalid(format!(
                    "the {tier} tier's dtype {} is not a float dtype: tiers convert float tensors \
                     only, and integer tensors keep their stored dtype",
                    dtype.name()
                )));
            }
            let device = placement.device;
            let host_tier = i < 2;
            let allowed = if host_tier {
                matches!(device, Device::Disk | Device::Cpu)
            } else {
                device == compute
            };
            if !allowed {
                let expected = if host_tier {
                    "disk or cpu".to_string()
                } else {
                    format!("the context's compute device ({})", compute.name())
                };
                return Err(Error::invalid(format!(
                    "the {tier} tier cannot be on {}: it must be {expected}",
                    device.name()
                )));
            }
        }
        if self.offload.device == Device::Cpu && self.onload.device == Device::Disk {
            return Err(Error::invalid(
                "the onload tier cannot be on disk when the offload tier is on the cpu",
            ));
        }
        Ok(())
    }

    pub fn placement(&self, tier: Tier) -> Placement {
        match tier {
            Tier::Offload => self.offload,
            Tier::Onload => self.onload,
            Tier::Preparing => self.preparing,
            Tier::Computation => self.computation,
        }
    }

    /// How a tensor stored as `source` with `ndim` dimensions looks in `tier`.
    ///
    /// A tier whose dtype is SOURCE keeps the form the tensor has one tier up (onload keeps the
    /// offload form, preparing the onload form), so "store fp8, compute bf16" needs only those two
    /// tiers set. Offload and computation at SOURCE mean the stored dtype.
    pub fn repr(&self, tier: Tier, source: DType, ndim: usize) -> Repr {
        let stored = Repr {
            dtype: source,
            quant: Quant::None,
        };
        let inherited = match tier {
            Tier::Offload | Tier::Computation => stored,
            Tier::Onload => self.repr(Tier::Offload, source, ndim),
            Tier::Preparing => self.repr(Tier::Onload, source, ndim),
        };
        match self.placement(tier).dtype {
            None => inherited,
            Some(dtype) => self.explicit_repr(tier, dtype, source, ndim),
        }
    }

    /// The form a tensor takes in a tier that names `dtype`. A float dtype applies to float tensors
    /// only (as `module.to(dtype)` does). fp8 storage applies only to tensors of two or more
    /// dimensions: biases and norms keep their stored dtype in every tier but the computation
    /// tier, where the caller asked for exactly that dtype, unscaled.
    fn explicit_repr(&self, tier: Tier, dtype: DType, source: DType, ndim: usize) -> Repr {
        let stored = Repr {
            dtype: source,
            quant: Quant::None,
        };
        let is_computation = tier == Tier::Computation;
        if !source.is_float() || (dtype.is_fp8() && !is_computation && ndim < 2) {
            return stored;
        }
        let quant = if dtype.is_fp8() && !is_computation {
            self.quant
        } else {
            Quant::None
        };
        Repr { dtype, quant }
    }
}
