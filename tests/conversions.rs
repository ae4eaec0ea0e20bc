//! Every pair of float dtypes through the C ABI (registered in one dtype, handed out in another),
//! checked byte for byte against expectations computed outside the engine: the `half` crate for
//! f16 and bf16, Rust's own casts for f32 and f64, and the fp8 encoder whose hand-checked tables
//! are in src/convert/tests.rs.

mod common;
use common::*;
use strata::convert::{f32_to_fp8, fp8_to_f32};
use strata::dtype::DType;

/// Values every dtype meets: zeros, signs, subnormals of each format, saturation points,
/// halfway cases, infinities and NaN.
const VALUES: [f32; 20] = [
    0.0,
    -0.0,
    1.0,
    -1.5,
    3.140625,
    0.1,
    448.0,
    480.0,
    57344.0,
    65504.0,
    1.0e6,
    -1.0e-3,
    1.0 / 512.0,      // 2^-9: e4m3's smallest subnormal
    1.0 / 65536.0,    // 2^-16: e5m2's smallest subnormal
    1.0 / 16777216.0, // 2^-24: f16's smallest subnormal
    1.0e-30,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    1.0625,
];

fn encode(value: f32, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => value.to_le_bytes().to_vec(),
        DType::F64 => (value as f64).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(value).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        DType::F8E4M3 | DType::F8E5M2 => vec![f32_to_fp8(value, dtype)],
        _ => unreachable!(),
    }
}

fn decode(bytes: &[u8], dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes(bytes.try_into().unwrap()),
        DType::F64 => f64::from_le_bytes(bytes.try_into().unwrap()) as f32,
        DType::F16 => half::f16::from_le_bytes(bytes.try_into().unwrap()).to_f32(),
        DType::BF16 => half::bf16::from_le_bytes(bytes.try_into().unwrap()).to_f32(),
        DType::F8E4M3 | DType::F8E5M2 => fp8_to_f32(bytes[0], dtype),
        _ => unreachable!(),
    }
}

#[test]
fn every_float_pair_gives_the_independently_computed_bytes() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let mut checked = 0;
    for from in DType::floats().iter().copied() {
        // The source tensor holds each value as `from` stores it: these are exact in f32.
        let stored: Vec<f32> = VALUES
            .iter()
            .map(|&v| decode(&encode(v, from), from))
            .collect();
        let bytes: Vec<u8> = stored.iter().flat_map(|&v| encode(v, from)).collect();
        for to in DType::floats().iter().copied() {
            let group = ctx.group(&tiers(|t| t.computation.dtype = to.to_abi()));
            let name = format!("{from:?}->{to:?}");
            let layer = ctx.register(
                group,
                &name,
                &[("t", from.to_abi(), vec![VALUES.len() as i64], bytes.clone())],
            );
            let got = ctx.acquire(layer).remove(0).1;
            ctx.release(layer);
            for (i, &value) in stored.iter().enumerate() {
                let size = to.size();
                let got = &got[i * size..(i + 1) * size];
                if value.is_nan() {
                    assert!(decode(got, to).is_nan(), "{name}: NaN stays NaN");
                } else {
                    assert_eq!(got, encode(value, to), "{name}: {value:e}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 36 * VALUES.len());
}
