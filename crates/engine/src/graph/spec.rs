//! What a node type declares: its ports and parameters, with their kinds, ranges and defaults.
//!
//! These declarations are plain data, below the node files that fill them in and the editor,
//! validator and command line that read them, so every layer agrees on one description.

use std::collections::BTreeMap;

use super::{ParamValue, PortType};

/// What a node type declares: its ports and parameters.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The name stored in workflow files.
    pub type_name: &'static str,
    /// The name a person reads.
    pub title: &'static str,
    /// Where node search lists it, e.g. "loaders" or "sampling".
    pub category: &'static str,
    pub description: &'static str,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    pub params: Vec<ParamSpec>,
    /// Output nodes (save, preview) are what a run is for; they always execute.
    pub is_output: bool,
}

impl NodeSpec {
    pub fn input(&self, name: &str) -> Option<&PortSpec> {
        self.inputs.iter().find(|p| p.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&PortSpec> {
        self.outputs.iter().find(|p| p.name == name)
    }

    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The parameters that apply to a node set as `view` sees it, in declaration order.
    pub fn applicable_params(&self, view: &ParamView<'_>) -> Vec<&ParamSpec> {
        self.params.iter().filter(|p| p.applies_to(view)).collect()
    }
}

/// What a parameter's rule of applicability sees of its node: the parameter values (the
/// declared default where the node stores none) and which inputs are connected.
pub struct ParamView<'a> {
    spec: &'a NodeSpec,
    values: &'a BTreeMap<String, ParamValue>,
    connected: &'a dyn Fn(&str) -> bool,
}

impl<'a> ParamView<'a> {
    pub fn new(
        spec: &'a NodeSpec,
        values: &'a BTreeMap<String, ParamValue>,
        connected: &'a dyn Fn(&str) -> bool,
    ) -> Self {
        ParamView {
            spec,
            values,
            connected,
        }
    }

    /// The value of text or choice parameter `name`; empty for any other kind.
    pub fn text(&self, name: &str) -> &str {
        let value = self
            .values
            .get(name)
            .or_else(|| self.spec.param(name).map(|p| &p.default));
        match value {
            Some(ParamValue::Text(text)) => text,
            _ => "",
        }
    }

    /// Whether a link feeds input `name`.
    pub fn is_connected(&self, name: &str) -> bool {
        (self.connected)(name)
    }
}

/// Whether parameter `param` applies to a node as `view` sees it.
pub type AppliesFn = fn(view: &ParamView<'_>, param: &str) -> bool;

/// An input or output port.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: &'static str,
    pub ty: PortType,
    pub optional: bool,
}

impl PortSpec {
    pub fn required(name: &'static str, ty: PortType) -> Self {
        PortSpec {
            name,
            ty,
            optional: false,
        }
    }

    pub fn optional(name: &'static str, ty: PortType) -> Self {
        PortSpec {
            name,
            ty,
            optional: true,
        }
    }
}

/// The kind of a parameter: what values it takes and which widget edits it.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamKind {
    Int {
        min: i64,
        max: i64,
    },
    /// A random seed: an integer in [0, 2⁵³) (exact in JSON everywhere).
    Seed,
    Float {
        min: f64,
        max: f64,
    },
    Text {
        multiline: bool,
    },
    Choice(&'static [&'static str]),
    /// A file or folder on disk; empty means "none".
    Path {
        folder: bool,
    },
}

/// The largest seed: 2⁵³ − 1, the largest integer every JSON reader keeps exactly.
pub const MAX_SEED: i64 = (1 << 53) - 1;

/// A parameter: its name, kind, default and a line of help.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: ParamValue,
    pub help: &'static str,
    /// When the parameter applies (none: always). The editor hides one that does not, as a
    /// CFG method's own scales under another method; its value stays in the workflow.
    pub applies: Option<AppliesFn>,
    /// Folded away under "more" in the editor: a setting most runs leave alone, or a file the
    /// loader finds by itself.
    pub folded: bool,
}

impl ParamSpec {
    pub fn int(name: &'static str, min: i64, max: i64, default: i64, help: &'static str) -> Self {
        let kind = ParamKind::Int { min, max };
        Self::new(name, kind, ParamValue::Int(default), help)
    }

    pub fn seed(name: &'static str, help: &'static str) -> Self {
        Self::new(name, ParamKind::Seed, ParamValue::Int(0), help)
    }

    pub fn float(name: &'static str, min: f64, max: f64, default: f64, help: &'static str) -> Self {
        let kind = ParamKind::Float { min, max };
        Self::new(name, kind, ParamValue::Float(default), help)
    }

    pub fn text(name: &'static str, multiline: bool, default: &str, help: &'static str) -> Self {
        let kind = ParamKind::Text { multiline };
        Self::new(name, kind, ParamValue::Text(default.into()), help)
    }

    pub fn choice(
        name: &'static str,
        options: &'static [&'static str],
        default: &str,
        help: &'static str,
    ) -> Self {
        let kind = ParamKind::Choice(options);
        Self::new(name, kind, ParamValue::Text(default.into()), help)
    }

    pub fn path(name: &'static str, folder: bool, help: &'static str) -> Self {
        let kind = ParamKind::Path { folder };
        Self::new(name, kind, ParamValue::Text(String::new()), help)
    }

    fn new(name: &'static str, kind: ParamKind, default: ParamValue, help: &'static str) -> Self {
        ParamSpec {
            name,
            kind,
            default,
            help,
            applies: None,
            folded: false,
        }
    }

    /// The parameter applies only where `applies` says so.
    pub fn when(self, applies: AppliesFn) -> Self {
        ParamSpec {
            applies: Some(applies),
            ..self
        }
    }

    /// The parameter is folded away under "more" in the editor.
    pub fn folded(self) -> Self {
        ParamSpec {
            folded: true,
            ..self
        }
    }

    /// Whether the parameter applies to a node as `view` sees it.
    pub fn applies_to(&self, view: &ParamView<'_>) -> bool {
        self.applies.is_none_or(|applies| applies(view, self.name))
    }

    /// Checks a stored value against this parameter, returning it in its canonical form
    /// (integral floats become integers for integer parameters, integers become floats for
    /// float parameters).
    pub fn check(&self, value: &ParamValue) -> Result<ParamValue, String> {
        let in_range = |x: f64, min: f64, max: f64| {
            if x < min || x > max {
                Err(format!("{x} is out of range [{min}, {max}]"))
            } else {
                Ok(())
            }
        };
        let integer_bounds = match self.kind {
            ParamKind::Int { min, max } => Some((min, max)),
            ParamKind::Seed => Some((0, MAX_SEED)),
            _ => None,
        };
        if let Some((min, max)) = integer_bounds {
            let n = match *value {
                ParamValue::Int(n) => n,
                ParamValue::Float(x) if x.fract() == 0.0 && x.abs() < 2f64.powi(63) => x as i64,
                _ => return Err(format!("{value} is not {}", self.kind_description())),
            };
            in_range(n as f64, min as f64, max as f64)?;
            return Ok(ParamValue::Int(n));
        }
        match (&self.kind, value) {
            (ParamKind::Float { min, max }, ParamValue::Int(n)) => {
                in_range(*n as f64, *min, *max)?;
                Ok(ParamValue::Float(*n as f64))
            }
            (ParamKind::Float { min, max }, ParamValue::Float(x)) => {
                if !x.is_finite() {
                    return Err(format!("{x} is not a finite number"));
                }
                in_range(*x, *min, *max)?;
                Ok(value.clone())
            }
            (ParamKind::Choice(options), ParamValue::Text(s)) => {
                if options.contains(&s.as_str()) {
                    Ok(value.clone())
                } else {
                    Err(format!("{s:?} is not one of {}", options.join(", ")))
                }
            }
            (ParamKind::Text { .. } | ParamKind::Path { .. }, ParamValue::Text(_)) => {
                Ok(value.clone())
            }
            _ => Err(format!("{value} is not {}", self.kind_description())),
        }
    }

    /// Parses a value typed by a person (for example on the command line) for this parameter.
    pub fn parse(&self, text: &str) -> Result<ParamValue, String> {
        let value = match self.kind {
            ParamKind::Int { .. } | ParamKind::Seed => text
                .trim()
                .parse::<i64>()
                .map(ParamValue::Int)
                .map_err(|_| format!("{text:?} is not {}", self.kind_description()))?,
            ParamKind::Float { .. } => text
                .trim()
                .parse::<f64>()
                .map(ParamValue::Float)
                .map_err(|_| format!("{text:?} is not {}", self.kind_description()))?,
            _ => ParamValue::Text(text.to_string()),
        };
        self.check(&value)
    }

    fn kind_description(&self) -> String {
        match self.kind {
            ParamKind::Int { .. } | ParamKind::Seed => "an integer".into(),
            ParamKind::Float { .. } => "a number".into(),
            ParamKind::Text { .. } => "text".into(),
            ParamKind::Choice(options) => format!("one of {}", options.join(", ")),
            ParamKind::Path { .. } => "a path".into(),
        }
    }
}
