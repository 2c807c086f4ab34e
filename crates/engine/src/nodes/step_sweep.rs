//! Step Sweep: one start latent integrated with each of several step counts (1, 2, 4, 8, 16
//! by default) by one or two guided models, decoded onto a contact sheet whose cells give each
//! picture's path straightness and time. Few-step claims (a reflowed model against its
//! teacher, one sampler against another) are then seen side by side from the same noise.

use std::time::Instant;

use crate::contact_sheet::{ContactSheet, SheetCell, SheetRow};
use crate::error::InputError;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Guider, Image, Latent, Value};
use crate::model::{image_from_tensor, tensor_from_image};
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};
use crate::nodes::sampler::{Integration, integration_params};

/// Columns a sheet may have: each is a full run per model.
const MAX_STEP_COUNTS: usize = 12;

pub fn definition() -> NodeDef {
    let mut params = integration_params(ParamSpec::text(
        "steps",
        false,
        "1, 2, 4, 8, 16",
        "step counts, one column each",
    ));
    params.extend([
        ParamSpec::text("label", false, "model A", "title of the guider's row"),
        ParamSpec::text("label_b", false, "model B", "title of guider_b's row")
            .when(|view, _| view.is_connected("guider_b")),
        ParamSpec::float(
            "shift_b",
            0.01,
            100.0,
            3.0,
            "shifted: guider_b's shift (a few-step model may want its own)",
        )
        .when(|view, _| view.is_connected("guider_b") && view.text("scheduler") == "shifted"),
    ]);
    NodeDef {
        spec: NodeSpec {
            type_name: "step_sweep",
            title: "Step Sweep",
            category: "sampling",
            description: "Samples the start with each step count, by one model or two, and lays the pictures out in a grid with each path's straightness and time.",
            inputs: vec![
                PortSpec::required("guider", PortType::Guider),
                PortSpec::required("latent", PortType::Latent),
                PortSpec::optional("guider_b", PortType::Guider),
            ],
            outputs: vec![PortSpec::required("image", PortType::Image)],
            params,
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let step_counts = parse_step_counts(ctx.text("steps"))?;
    let start = ctx.latent("latent")?;
    if start.tensor.dim(0)? != 1 {
        return Err(InputError(format!(
            "input latent holds {} pictures; a sweep starts from one",
            start.tensor.dim(0)?
        ))
        .into());
    }
    let first = ctx.guider("guider")?;
    let mut guiders = vec![(
        ctx.text("label").to_string(),
        Integration::from_params(ctx, &first, &start)?,
        first,
    )];
    if let Some(second) = ctx.optional_guider("guider_b")? {
        let integration =
            Integration::from_params(ctx, &second, &start)?.with_shift(ctx.float("shift_b"));
        guiders.push((ctx.text("label_b").to_string(), integration, second));
    }
    let mut rows = Vec::new();
    for (label, integration, guider) in guiders {
        let mut cells = Vec::new();
        let mut figures = Vec::new();
        for &steps in &step_counts {
            let (cell, straightness, seconds) =
                sweep_cell(ctx, &integration, &guider, &start, steps)?;
            figures.push(format!("{steps}: {straightness:.3} in {seconds:.2} s"));
            cells.push(cell);
        }
        let _ = ctx.emit(NodeEvent::Info(format!(
            "{label}, straightness by steps: {}",
            figures.join(", ")
        )));
        rows.push(SheetRow {
            title: label,
            cells,
        });
    }
    let sheet = ContactSheet {
        column_titles: step_counts.iter().map(|&n| steps_title(n)).collect(),
        rows,
    }
    .render();
    Ok(vec![Value::Image(Image(tensor_from_image(&sheet)?))])
}

/// One picture of the sweep, sampled in `steps` steps and decoded, captioned with its path's
/// straightness and the time both took; those two figures are returned beside it.
fn sweep_cell(
    ctx: &mut NodeContext<'_>,
    integration: &Integration,
    guider: &Guider,
    start: &Latent,
    steps: usize,
) -> anyhow::Result<(SheetCell, f64, f64)> {
    let began = Instant::now();
    let output = integration.run(ctx, guider, start, steps)?;
    let picture = guider.model.decode(&output.latent)?;
    let seconds = began.elapsed().as_secs_f64();
    let cell = SheetCell {
        image: image_from_tensor(&picture)?,
        caption: vec![
            format!("straightness {:.3}", output.straightness),
            format!("{seconds:.2} s"),
        ],
    };
    Ok((cell, output.straightness, seconds))
}

fn steps_title(steps: usize) -> String {
    if steps == 1 {
        "1 step".into()
    } else {
        format!("{steps} steps")
    }
}

/// The step counts written as a list such as `1, 2, 4, 8, 16`.
fn parse_step_counts(text: &str) -> Result<Vec<usize>, InputError> {
    let invalid = |why: String| {
        InputError(format!(
            "steps \"{text}\" {why}; write step counts from 1 to 1000 separated by commas, such as 1, 2, 4, 8, 16"
        ))
    };
    let counts = text
        .split([',', ' '])
        .filter(|part| !part.is_empty())
        .map(|part| match part.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(invalid(format!("has \"{part}\""))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if counts.is_empty() {
        return Err(invalid("lists no step count".into()));
    }
    if counts.len() > MAX_STEP_COUNTS {
        return Err(invalid(format!(
            "lists {} step counts, more than {MAX_STEP_COUNTS}",
            counts.len()
        )));
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_counts_are_read_from_a_list_and_bad_lists_are_named() {
        assert_eq!(parse_step_counts("1, 2,4  8,16").unwrap(), [1, 2, 4, 8, 16]);
        for (bad, expected) in [
            ("1, two", "has \"two\""),
            ("0", "has \"0\""),
            (" , ", "lists no step count"),
            ("1,2,3,4,5,6,7,8,9,10,11,12,13", "13 step counts"),
        ] {
            let error = parse_step_counts(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }
}
