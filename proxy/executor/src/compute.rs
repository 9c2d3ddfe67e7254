//! The compute backend under the scheduler: the running sequences' KV
//! caches and one forward pass over a step's rows, on the CPU
//! ([`crate::model`]) or a GPU ([`crate::cuda::model`]). Scheduling,
//! sampling and stop conditions are shared and live in [`crate::engine`].

use crate::cuda::model::CudaModel;
use crate::model::{Model, ModelError, ModelShape, Row, Scratch, SeqCache};
use crate::pool::ThreadPool;

/// What sampling a row's next token needs from its logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The whole row (temperature sampling, top log-probabilities).
    Full,
    /// Only the best token and its log-probability (greedy).
    Best,
}

/// A row's logits, or what [`Need::Best`] asked of them.
#[derive(Clone, Copy, Debug)]
pub enum Next<'a> {
    Logits(&'a [f32]),
    /// The best token (the lowest id on a tie), its logit and the
    /// log-softmax normaliser.
    Best {
        token: u32,
        logit: f32,
        lse: f32,
    },
}

/// The logits of one step's rows that asked for them, in row order.
#[derive(Debug, Default)]
pub struct StepLogits {
    vocab: usize,
    full: Vec<f32>,
    rows: Vec<Entry>,
}

#[derive(Clone, Copy, Debug)]
enum Entry {
    /// Offset of the row in `full`.
    Full(usize),
    Best {
        token: u32,
        logit: f32,
        lse: f32,
    },
}

impl StepLogits {
    /// Every row whole: `full` holds them one after another.
    pub fn whole(vocab: usize, full: Vec<f32>) -> StepLogits {
        let rows = (0..full.len() / vocab.max(1))
            .map(|i| Entry::Full(i * vocab))
            .collect();
        StepLogits { vocab, full, rows }
    }

    pub(crate) fn with_vocab(vocab: usize) -> StepLogits {
        StepLogits {
            vocab,
            ..StepLogits::default()
        }
    }

    pub(crate) fn push_full(&mut self, logits: &[f32]) {
        self.rows.push(Entry::Full(self.full.len()));
        self.full.extend_from_slice(logits);
    }

    pub(crate) fn push_best(&mut self, token: u32, logit: f32, lse: f32) {
        self.rows.push(Entry::Best { token, logit, lse });
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<Next<'_>> {
        Some(match *self.rows.get(i)? {
            Entry::Full(at) => Next::Logits(&self.full[at..at + self.vocab]),
            Entry::Best { token, logit, lse } => Next::Best { token, logit, lse },
        })
    }
}

/// The CPU backend's state.
#[derive(Debug)]
pub struct Cpu {
    pub model: Model,
    pub pool: ThreadPool,
    caches: Vec<SeqCache>,
    scratch: Scratch,
}

/// Where the forward pass runs. Sequences are numbered by their place in
/// the scheduler's running list; removing one moves the last into its
/// place, as `Vec::swap_remove` does.
#[derive(Debug)]
pub enum Compute {
    Cpu(Box<Cpu>),
    Gpu(Box<CudaModel>),
}

impl Compute {
    pub fn cpu(model: Model, pool: ThreadPool) -> Compute {
        Compute::Cpu(Box::new(Cpu {
            model,
            pool,
            caches: Vec::new(),
            scratch: Scratch::default(),
        }))
    }

    /// The device in words, for logs.
    pub fn device(&self) -> String {
        match self {
            Compute::Cpu(_) => "cpu".to_string(),
            Compute::Gpu(gpu) => format!("cuda:{} ({})", gpu.gpu().ordinal, gpu.gpu().name),
        }
    }

    pub fn shape(&self) -> &ModelShape {
        match self {
            Compute::Cpu(cpu) => cpu.model.shape(),
            Compute::Gpu(gpu) => gpu.shape(),
        }
    }

    /// A new sequence with an empty cache, numbered after the others.
    pub fn add_sequence(&mut self) -> Result<(), ModelError> {
        match self {
            Compute::Cpu(cpu) => {
                cpu.caches.push(SeqCache::new(cpu.model.shape()));
                Ok(())
            }
            Compute::Gpu(gpu) => gpu.add_sequence(),
        }
    }

    pub fn remove_sequence(&mut self, i: usize) {
        match self {
            Compute::Cpu(cpu) => {
                cpu.caches.swap_remove(i);
            }
            Compute::Gpu(gpu) => gpu.remove_sequence(i),
        }
    }

    pub fn clear(&mut self) {
        match self {
            Compute::Cpu(cpu) => cpu.caches.clear(),
            Compute::Gpu(gpu) => gpu.clear(),
        }
    }

    /// Runs `rows` (see [`Model::forward`]) and returns the logits of the
    /// rows that asked for them; `need(seq)` says what sampling needs of a
    /// sequence's row. The CPU backend always returns whole rows.
    pub fn forward(
        &mut self,
        rows: &[Row],
        need: impl Fn(usize) -> Need,
    ) -> Result<StepLogits, ModelError> {
        match self {
            Compute::Cpu(cpu) => {
                let logits =
                    cpu.model
                        .forward(&cpu.pool, rows, &mut cpu.caches, &mut cpu.scratch)?;
                Ok(StepLogits::whole(cpu.model.shape().vocab, logits))
            }
            Compute::Gpu(gpu) => gpu.forward(rows, need),
        }
    }
}
