//! Reflow (2-rectified flow; Liu, Gong & Liu 2022, "Flow straight and fast"): the teacher's
//! sampler pairs each start noise with the picture it ends at, and a flow trained on those
//! couplings moves each noise straight to its own picture. Its paths then cross less, so few
//! Euler steps follow them.
//!
//! The teacher runs as the default workflow runs it: 16 Euler steps, rescaled CFG 4 and
//! autoguidance 4 by its weaker guide, both for σ ≥ 0.3 (a test checks these against the
//! default workflow). The student so learns the guided flow itself and needs no CFG pass.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use flowline_engine::files::{save_safetensors, write_atomic};
use flowline_engine::flow::guidance::{Guidance, GuidanceMethod};
use flowline_engine::flow::sampler::SamplerKind;
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::model::FlowModel;

use crate::dataset::{is_held_out, sample};
use crate::eval::{Case, EvalSettings, Generator, WeakGuide};

/// The couplings' tensors and prompts, in a run's folder.
pub const COUPLINGS_FILE: &str = "couplings.safetensors";
pub const COUPLING_PROMPTS_FILE: &str = "couplings.json";
/// The data-set seed the couplings' prompts are drawn from (training uses 1, evaluation 9001).
pub const COUPLING_PROMPT_SEED: u64 = 7_001;

/// The teacher's sampling, as the default workflow's CFG and Sampler nodes set it.
pub const TEACHER_STEPS: usize = 16;
pub const TEACHER_SHIFT: f64 = 3.0;
pub const TEACHER_GUIDANCE: Guidance = Guidance {
    scale: 4.0,
    method: GuidanceMethod::Rescale,
    rescale_multiplier: 0.7,
    apg_parallel_scale: 0.0,
    apg_norm_threshold: 0.0,
    interval: (0.3, 1.0),
};
pub const TEACHER_AUTOGUIDE_SCALE: f64 = 4.0;

/// Start noises and the teacher's pictures of them (as latents), with each one's prompt.
#[derive(Debug, Clone)]
pub struct Couplings {
    /// `[N, C, h, w]` start noise.
    pub noise: Tensor,
    /// `[N, C, h, w]` latents the teacher ended at from `noise`.
    pub clean: Tensor,
    pub prompts: Vec<String>,
}

impl Couplings {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The couplings saved in `folder`, if it has any.
    pub fn read(folder: &Path, device: &Device) -> anyhow::Result<Option<Couplings>> {
        let (tensors_path, prompts_path) = (
            folder.join(COUPLINGS_FILE),
            folder.join(COUPLING_PROMPTS_FILE),
        );
        if !tensors_path.exists() {
            return Ok(None);
        }
        let tensors = candle_core::safetensors::load(&tensors_path, device)
            .with_context(|| format!("cannot read {}", tensors_path.display()))?;
        let prompts: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(&prompts_path)
                .with_context(|| format!("cannot read {}", prompts_path.display()))?,
        )
        .with_context(|| format!("{} is broken", prompts_path.display()))?;
        let tensor = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .with_context(|| format!("{} has no tensor {name}", tensors_path.display()))
        };
        let couplings = Couplings {
            noise: tensor("noise")?,
            clean: tensor("clean")?,
            prompts,
        };
        anyhow::ensure!(
            couplings.noise.dim(0)? == couplings.len()
                && couplings.clean.dim(0)? == couplings.len(),
            "{} and {} hold different numbers of couplings",
            tensors_path.display(),
            prompts_path.display()
        );
        Ok(Some(couplings))
    }

    /// Writes the couplings into `folder`, atomically.
    pub fn write(&self, folder: &Path) -> anyhow::Result<()> {
        let tensors = [
            ("noise".to_string(), self.noise.clone()),
            ("clean".to_string(), self.clean.clone()),
        ]
        .into_iter()
        .collect();
        save_safetensors(&tensors, &folder.join(COUPLINGS_FILE))?;
        write_atomic(
            &folder.join(COUPLING_PROMPTS_FILE),
            serde_json::to_string(&self.prompts)?.as_bytes(),
        )
    }

    /// These couplings followed by `more`.
    pub fn extended(self, more: Couplings) -> anyhow::Result<Couplings> {
        let mut prompts = self.prompts;
        prompts.extend(more.prompts);
        Ok(Couplings {
            noise: Tensor::cat(&[&self.noise, &more.noise], 0)?,
            clean: Tensor::cat(&[&self.clean, &more.clean], 0)?,
            prompts,
        })
    }

    /// The `[B, C, h, w]` noise and clean latents and the prompts of couplings `indices`.
    pub fn batch(&self, indices: &[u32]) -> anyhow::Result<(Tensor, Tensor, Vec<String>)> {
        let device = self.noise.device();
        let index = Tensor::from_slice(indices, indices.len(), device)?;
        Ok((
            self.noise.index_select(&index, 0)?,
            self.clean.index_select(&index, 0)?,
            indices
                .iter()
                .map(|&i| self.prompts[i as usize].clone())
                .collect(),
        ))
    }
}

/// Couplings `first..first + count` of the sequence every reflow run draws: training captions
/// (never held-out ones), each with its own noise seed.
pub fn coupling_cases(first: usize, count: usize) -> Vec<Case> {
    (0u64..)
        .map(|index| (index, sample(COUPLING_PROMPT_SEED, index).caption))
        .filter(|(_, caption)| !is_held_out(caption))
        .skip(first)
        .take(count)
        .map(|(index, caption)| Case {
            caption,
            seed: 2_000_000 + index,
        })
        .collect()
}

/// Runs `teacher`, autoguided by `guide`, on `cases` as the default workflow does, `batch`
/// images at a time.
pub fn generate(
    teacher: &Arc<dyn FlowModel>,
    guide: &Arc<dyn FlowModel>,
    cases: &[Case],
    batch: usize,
) -> anyhow::Result<Couplings> {
    let settings = EvalSettings {
        samplers: vec![SamplerKind::Euler],
        steps: vec![TEACHER_STEPS],
        scheduler: Scheduler::Shifted {
            shift: TEACHER_SHIFT,
        },
        guidance: TEACHER_GUIDANCE,
        batch,
        start_sigma: 1.0,
        eta: 1.0,
        classifier_scale: 0.0,
    };
    let weak = WeakGuide {
        model: guide.clone(),
        scale: TEACHER_AUTOGUIDE_SCALE,
    };
    let generator = Generator::new(teacher, Some(&weak), cases, &settings)?;
    let (clean, _) = generator.latents(SamplerKind::Euler, TEACHER_STEPS)?;
    Ok(Couplings {
        noise: Tensor::cat(generator.starts(), 0)?,
        clean: Tensor::cat(&clean, 0)?,
        prompts: cases.iter().map(|case| case.caption.text()).collect(),
    })
}
