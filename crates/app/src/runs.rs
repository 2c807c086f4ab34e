//! What the app knows about runs, built only from executor events.
//!
//! The UI thread drains the event channel without blocking at the start of every frame and
//! folds each event into [`Runs`]; everything the node editor and the preview panel show about
//! running (node states, the queue, steps, the final image, errors) is read from here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use flowline_engine::executor::{Event, RunFailure, RunId, StepUpdate};

/// What happened to a node in the run on display.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeStatus {
    Running,
    Done { seconds: f64 },
    Cached,
    Failed(String),
}

/// A queued run's state, for the queue list.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    Waiting,
    Running,
    Finished,
    Cancelled,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct QueuedRun {
    pub id: RunId,
    pub state: RunState,
    /// The workflow as it was sent, to embed in images the run makes.
    pub workflow: Arc<String>,
}

/// The final image of a run.
pub struct FinalImage {
    pub image: image::RgbImage,
    pub path: Option<PathBuf>,
    pub node: String,
    /// The workflow of the run that made it.
    pub workflow: Option<Arc<String>>,
}

/// Node states, steps and results of the run on display (the latest one started), plus the
/// queue of every run sent this session.
#[derive(Default)]
pub struct Runs {
    pub queue: Vec<QueuedRun>,
    /// The run whose progress is shown.
    pub shown: Option<RunId>,
    pub node_status: HashMap<String, NodeStatus>,
    /// Problems found before anything ran, per node (a graph-wide problem under "").
    pub invalid: HashMap<String, Vec<String>>,
    pub warnings: Vec<(String, String)>,
    /// Things a node reported for the user's information (e.g. memory a model load needs).
    pub infos: Vec<(String, String)>,
    /// Every sampler step of the shown run, in order.
    pub steps: Vec<StepUpdate>,
    /// The node that made `steps`.
    pub step_node: Option<String>,
    /// The σ values and straightness of the shown run's finished sampler.
    pub trajectory: Option<(Vec<f64>, f64)>,
    pub image: Option<FinalImage>,
    /// Bumped whenever `image` changes, so the view knows to upload a new texture.
    pub image_version: u64,
    /// The outcome of the shown run once it ended, as a line for the status bar.
    pub outcome: Option<String>,
}

impl Runs {
    pub fn queued(&mut self, id: RunId, workflow: Arc<String>) {
        self.queue.push(QueuedRun {
            id,
            state: RunState::Waiting,
            workflow,
        });
    }

    /// The run that is executing or waiting longest, which Cancel stops first.
    pub fn active(&self) -> Option<RunId> {
        let running = self.queue.iter().find(|r| r.state == RunState::Running);
        running
            .or_else(|| self.queue.iter().find(|r| r.state == RunState::Waiting))
            .map(|r| r.id)
    }

    pub fn pending(&self) -> impl Iterator<Item = &QueuedRun> {
        self.queue
            .iter()
            .filter(|r| matches!(r.state, RunState::Waiting | RunState::Running))
    }

    fn set_state(&mut self, run: RunId, state: RunState) {
        if let Some(entry) = self.queue.iter_mut().find(|r| r.id == run) {
            entry.state = state;
        }
    }

    /// Folds one executor event in.
    pub fn apply(&mut self, event: Event) {
        let run = event.run();
        if let Event::RunStarted { .. } = event {
            self.set_state(run, RunState::Running);
            self.shown = Some(run);
            self.node_status.clear();
            self.invalid.clear();
            self.warnings.clear();
            self.infos.clear();
            self.steps.clear();
            self.step_node = None;
            self.trajectory = None;
            self.outcome = None;
            return;
        }
        match &event {
            Event::RunCancelled { .. } => self.set_state(run, RunState::Cancelled),
            Event::RunFinished { .. } => self.set_state(run, RunState::Finished),
            Event::RunFailed { failure, .. } => {
                self.set_state(run, RunState::Failed(failure.to_string()))
            }
            _ => {}
        }
        if self.shown != Some(run) {
            if let Event::RunFailed {
                failure: RunFailure::Invalid(_),
                ..
            } = &event
            {
                // An invalid graph fails without starting; show why all the same.
                self.shown = Some(run);
                self.node_status.clear();
                self.steps.clear();
                self.step_node = None;
            } else {
                return;
            }
        }
        match event {
            Event::RunStarted { .. } => {}
            Event::NodeStarted { node, .. } => {
                self.node_status.insert(node, NodeStatus::Running);
            }
            Event::NodeCached { node, .. } => {
                self.node_status.insert(node, NodeStatus::Cached);
            }
            Event::NodeFinished { node, seconds, .. } => {
                self.node_status.insert(node, NodeStatus::Done { seconds });
            }
            Event::NodeFailed { node, message, .. } => {
                self.node_status.insert(node, NodeStatus::Failed(message));
            }
            Event::Warning { node, message, .. } => self.warnings.push((node, message)),
            Event::Info { node, message, .. } => self.infos.push((node, message)),
            Event::Step { node, step, .. } => {
                if step.record.index == 0 {
                    self.steps.clear();
                    self.trajectory = None;
                }
                self.steps.push(*step);
                self.step_node = Some(node);
            }
            Event::Trajectory {
                sigmas,
                straightness,
                ..
            } => self.trajectory = Some((sigmas, straightness)),
            Event::Image {
                node, image, path, ..
            } => {
                let workflow = self
                    .queue
                    .iter()
                    .find(|r| r.id == run)
                    .map(|r| r.workflow.clone());
                self.image = Some(FinalImage {
                    image,
                    path,
                    node,
                    workflow,
                });
                self.image_version += 1;
            }
            Event::RunFinished { .. } => self.outcome = Some(format!("run {run} finished")),
            Event::RunCancelled { .. } => self.outcome = Some(format!("run {run} cancelled")),
            Event::RunFailed { failure, .. } => {
                if let RunFailure::Invalid(errors) = &failure {
                    for error in errors {
                        let line = match &error.item {
                            Some(item) => format!("{item}: {}", error.message),
                            None => error.message.clone(),
                        };
                        self.invalid
                            .entry(error.node.clone().unwrap_or_default())
                            .or_default()
                            .push(line);
                    }
                }
                self.outcome = Some(format!("run {run} failed: {failure}"));
            }
        }
    }

    /// The problem to show on `node`, if it failed or did not validate.
    pub fn problem(&self, node: &str) -> Option<String> {
        if let Some(NodeStatus::Failed(message)) = self.node_status.get(node) {
            return Some(message.clone());
        }
        self.invalid.get(node).map(|lines| lines.join("\n"))
    }
}
