//! The preview panel: the live step preview (x_σ and x̂0 side by side, drawn on the GPU), the
//! step scrubber, the plot of latent values over σ, and the decoded image.

use eframe::egui::{self, RichText};

use super::FlowlineApp;
use super::preview::{self, probe_values};

/// How far the final image can be scaled.
const ZOOM_RANGE: std::ops::RangeInclusive<f32> = 0.25..=8.0;

impl FlowlineApp {
    pub(super) fn preview_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Live preview");
        let count = self.frames.len();
        if count == 0 {
            ui.label("Press Run (Ctrl+Enter): every sampler step appears here as it happens.");
        } else {
            let shown = self.scrub.unwrap_or(count - 1).min(count - 1);
            let record = &self.runs.steps[shown].record;
            ui.label(format!(
                "step {} of {}   σ {:.3} to {:.3}   |v| {:.1}",
                record.index + 1,
                record.steps,
                record.sigma,
                record.sigma_next,
                record.velocity_norm
            ));
            let side = ((ui.available_width() - 12.0) / 2.0).clamp(64.0, 320.0);
            ui.horizontal(|ui| {
                ui.vertical(|ui| {
                    ui.label("canvas x_σ");
                    self.latent_view(ui, 0, shown, side, false);
                });
                ui.vertical(|ui| {
                    ui.label("predicted final x0");
                    self.latent_view(ui, 1, shown, side, true);
                });
            });
            let mut step = shown + 1;
            let finished = self.runs.trajectory.is_some();
            ui.horizontal(|ui| {
                ui.label("step");
                let slider = ui.add_enabled(
                    finished || count > 1,
                    egui::Slider::new(&mut step, 1..=count),
                );
                if slider.changed() {
                    self.scrub = if step == count { None } else { Some(step - 1) };
                }
                if self.scrub.is_some() && ui.button("live").clicked() {
                    self.scrub = None;
                }
            });
            self.sigma_plot(ui);
            if let Some((_, straightness)) = &self.runs.trajectory {
                ui.label(format!(
                    "straightness {straightness:.3} (1 = a straight line)"
                ));
            }
        }
        ui.separator();
        self.final_image(ui);
    }

    fn latent_view(&self, ui: &mut egui::Ui, slot: u32, step: usize, side: f32, clean: bool) {
        let frames = &self.frames[step];
        let frame = if clean { &frames.clean } else { &frames.canvas };
        if self.gpu_preview {
            preview::show(ui, slot, frame, side);
        } else {
            ui.label("(no GPU renderer: previews need wgpu)");
        }
    }

    fn sigma_plot(&self, ui: &mut egui::Ui) {
        use egui_plot::{Line, Plot, PlotPoints};
        let probes = self.traces.first().map_or(0, |(_, values)| values.len());
        let mut end = None;
        if self.runs.trajectory.is_some()
            && let Some(last) = self.runs.steps.last()
        {
            end = Some((last.record.sigma_next, probe_values(&last.record.clean)));
        }
        Plot::new("sigma-plot")
            .height(140.0)
            .x_axis_label("σ")
            .allow_scroll(false)
            .allow_drag(false)
            .show(ui, |plot| {
                for probe in 0..probes {
                    let points: PlotPoints = self
                        .traces
                        .iter()
                        .chain(end.iter())
                        .map(|(sigma, values)| [*sigma, f64::from(values[probe])])
                        .collect();
                    plot.line(Line::new(format!("latent {probe}"), points));
                }
            });
    }

    fn final_image(&mut self, ui: &mut egui::Ui) {
        let Some(image) = &self.runs.image else {
            ui.label("The decoded image appears here when a run ends.");
            return;
        };
        let version = self.runs.image_version;
        if self
            .image_texture
            .as_ref()
            .is_none_or(|(v, _)| *v != version)
        {
            let size = [image.image.width() as usize, image.image.height() as usize];
            // A picture wider than the panel at the chosen zoom (a step sweep's contact sheet,
            // say) is shown whole; smaller ones keep the zoom the user chose.
            let fitting = ui.available_width() / size[0] as f32;
            if self.zoom > fitting {
                self.zoom = fitting.clamp(*ZOOM_RANGE.start(), *ZOOM_RANGE.end());
            }
            let color = egui::ColorImage::from_rgb(size, image.image.as_raw());
            let texture =
                ui.ctx()
                    .load_texture("final-image", color, egui::TextureOptions::NEAREST);
            self.image_texture = Some((version, texture));
        }
        ui.horizontal(|ui| {
            ui.label(RichText::new("Image").strong());
            ui.add(egui::Slider::new(&mut self.zoom, ZOOM_RANGE).text("zoom"));
            if ui.button("Save Image…").clicked() {
                self.dialogs.save_image();
            }
        });
        match &image.path {
            Some(path) => ui.label(format!("from {}, saved as {}", image.node, path.display())),
            None => ui.label(format!("from {} (not saved)", image.node)),
        };
        if let Some((_, texture)) = &self.image_texture {
            egui::ScrollArea::both().show(ui, |ui| {
                ui.add(
                    egui::Image::new(texture).fit_to_exact_size(texture.size_vec2() * self.zoom),
                );
            });
        }
    }
}
