//! Where a local pool's model runs: the CPU, or an NVIDIA GPU through the
//! CUDA path ([`crate::cuda`]), and why.

use std::fmt;
use std::str::FromStr;

use crate::cuda::Gpu;

/// The `device` a pool asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU when a driver and a device are usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// This GPU (ordinal); the pool does not start without it.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    format!("{s:?} is not a device: use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device chosen, with the reason in words for the start-up log.
#[derive(Debug)]
pub enum Selected {
    Cpu { reason: String },
    Gpu { gpu: Box<Gpu>, reason: String },
}

/// Opens the device `choice` names. Only an explicit `cuda` fails: `auto`
/// falls back to the CPU with the reason the GPU was not usable.
pub fn select(choice: DeviceChoice) -> Result<Selected, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Selected::Cpu {
            reason: "device = \"cpu\"".to_string(),
        }),
        DeviceChoice::Auto => Ok(match Gpu::open(0) {
            Ok(gpu) => Selected::Gpu {
                gpu: Box::new(gpu),
                reason: "device = \"auto\" and a usable GPU was found".to_string(),
            },
            Err(why) => Selected::Cpu {
                reason: format!("device = \"auto\" and no usable GPU: {why}"),
            },
        }),
        DeviceChoice::Cuda(n) => match Gpu::open(n) {
            Ok(gpu) => Ok(Selected::Gpu {
                gpu: Box::new(gpu),
                reason: format!("device = \"cuda:{n}\""),
            }),
            Err(why) => Err(format!("device = \"cuda:{n}\" but {why}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:+1", "cuda: 1", "CUDA", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("\"cuda:N\""), "{bad}: {err}");
        }
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn cpu_never_touches_the_gpu() {
        match select(DeviceChoice::Cpu) {
            Ok(Selected::Cpu { reason }) => assert!(reason.contains("cpu")),
            other => panic!("device = cpu chose {other:?}"),
        }
    }
}
