//! The values that travel along links while a graph runs, one variant per [`PortType`].

use std::sync::Arc;

use candle_core::Tensor;

use super::PortType;
use crate::flow::guidance::Guidance;
use crate::model::{Conditioning, FlowModel};

/// A latent with the noise level it sits at (1 for pure noise, less for a source-image start).
#[derive(Debug, Clone)]
pub struct Latent {
    pub tensor: Tensor,
    pub sigma: f64,
}

/// Everything a sampler needs to ask for a guided velocity: the CFG node's output.
#[derive(Clone)]
pub struct Guider {
    pub model: Arc<dyn FlowModel>,
    pub positive: Arc<Conditioning>,
    pub negative: Option<Arc<Conditioning>>,
    pub guidance: Guidance,
}

impl Guider {
    /// The guided velocity at `x`, `sigma`; the unconditional pass runs only when needed.
    pub fn velocity(&self, x: &Tensor, sigma: f64) -> anyhow::Result<Tensor> {
        let cond = self.model.velocity(x, sigma, &self.positive)?;
        match &self.negative {
            Some(negative) if self.guidance.needs_unconditional(sigma) => {
                let uncond = self.model.velocity(x, sigma, negative)?;
                Ok(self.guidance.combine(x, sigma, &cond, &uncond)?)
            }
            _ => Ok(cond),
        }
    }
}

/// An RGB image as a `[3, height, width]` f32 tensor with values in [0, 1], on the CPU.
#[derive(Debug, Clone)]
pub struct Image(pub Tensor);

/// A value on a link.
#[derive(Clone)]
pub enum Value {
    Model(Arc<dyn FlowModel>),
    Conditioning(Arc<Conditioning>),
    Guider(Arc<Guider>),
    Latent(Latent),
    Image(Image),
}

impl Value {
    pub fn port_type(&self) -> PortType {
        match self {
            Value::Model(_) => PortType::Model,
            Value::Conditioning(_) => PortType::Conditioning,
            Value::Guider(_) => PortType::Guider,
            Value::Latent(_) => PortType::Latent,
            Value::Image(_) => PortType::Image,
        }
    }
}
