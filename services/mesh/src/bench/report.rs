//! The result of one `mesh bench` run: printed as a table, written as JSON
//! (`<results>/<scenario>.json`), as Markdown (`<scenario>.md`) and as a latency-percentile
//! plot (`<scenario>.svg`).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::{BenchError, measure::Measurement};

/// The version of the JSON layout; bumped when a field changes meaning or goes away.
pub(super) const SCHEMA: &str = "mesh-bench/1";

/// A figure derived from the measurements (a ratio, a size), with the goal it is read against.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Figure {
    /// What it is.
    pub(super) name: String,
    /// Its value.
    pub(super) value: f64,
    /// Its unit (`ratio`, `ms`, `bytes`, …).
    pub(super) unit: String,
    /// The goal, as text (`≥ 0.20`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) goal: Option<String>,
    /// Whether this run met the goal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) met: Option<bool>,
}

impl Figure {
    /// A figure without a goal.
    pub(super) fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            goal: None,
            met: None,
        }
    }

    /// A figure that should be at least `goal`.
    pub(super) fn at_least(name: impl Into<String>, value: f64, unit: &str, goal: f64) -> Self {
        Self {
            goal: Some(format!("≥ {}", format_value(goal))),
            met: Some(value >= goal),
            ..Self::new(name, value, unit)
        }
    }

    /// A figure that should be at most `goal`.
    pub(super) fn at_most(name: impl Into<String>, value: f64, unit: &str, goal: f64) -> Self {
        Self {
            goal: Some(format!("≤ {}", format_value(goal))),
            met: Some(value <= goal),
            ..Self::new(name, value, unit)
        }
    }
}

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Machine {
    /// Cores available to the process.
    pub(super) cores: usize,
    /// `std::env::consts::OS` / `ARCH`.
    pub(super) os: String,
    /// Worker threads of the servers' runtime.
    pub(super) server_threads: usize,
    /// Worker threads of the load generator's runtime.
    pub(super) client_threads: usize,
}

impl Machine {
    /// This machine.
    pub(super) fn here(server_threads: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            cores,
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            server_threads,
            client_threads: tokio::runtime::Handle::try_current()
                .map_or(0, |h| h.metrics().num_workers()),
        }
    }
}

/// One run of one scenario.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    /// [`SCHEMA`].
    pub(super) schema: &'static str,
    /// The scenario's name, as typed after `mesh bench`.
    pub(super) scenario: String,
    /// When the run began, in Unix seconds.
    pub(super) started_unix_s: i64,
    /// Where it ran.
    pub(super) machine: Machine,
    /// The settings it ran with (flag name → value).
    pub(super) settings: serde_json::Map<String, serde_json::Value>,
    /// The baseline first (`echo`), then the scenario's own measurements.
    pub(super) measurements: Vec<Measurement>,
    /// Ratios and other derived figures.
    pub(super) figures: Vec<Figure>,
    /// What the reader should know to read the figures.
    pub(super) notes: Vec<String>,
}

impl Report {
    /// The table printed to the terminal and put in the Markdown report.
    pub(super) fn table(&self) -> String {
        let mut out = String::from(
            "| measurement | calls/s | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for m in &self.measurements {
            let l = &m.latency_ms;
            out.push_str(&format!(
                "| {} | {:.1} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                m.name, m.per_second, m.errors, l.p50, l.p90, l.p99, l.p999, l.max
            ));
        }
        if !self.figures.is_empty() {
            out.push_str("\n| figure | value | goal | met |\n| --- | ---: | --- | --- |\n");
            for f in &self.figures {
                out.push_str(&format!(
                    "| {} | {} {} | {} | {} |\n",
                    f.name,
                    format_value(f.value),
                    f.unit,
                    f.goal.as_deref().unwrap_or(""),
                    match f.met {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "",
                    }
                ));
            }
        }
        out
    }

    /// The Markdown report, which shows the plot at `plot` (a file name beside it).
    pub(super) fn markdown(&self, plot: Option<&str>) -> String {
        let m = &self.machine;
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("`{k}` {v}"))
            .collect();
        let mut out = format!(
            "# mesh bench {}\n\n{} cores ({}), servers on {} worker threads, load generator on {}. \
             Settings: {}.\n\n",
            self.scenario,
            m.cores,
            m.os,
            m.server_threads,
            m.client_threads,
            settings.join(", ")
        );
        out.push_str(&self.table());
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(&format!("- {note}\n"));
            }
        }
        if let Some(plot) = plot {
            out.push_str(&format!("\n![latency by percentile]({plot})\n"));
        }
        out
    }

    /// Prints the table and writes the JSON, the plot and the Markdown report under
    /// `results`. Returns the JSON file's path.
    pub(super) fn write(&self, results: &Path) -> Result<PathBuf, BenchError> {
        std::fs::create_dir_all(results).map_err(|source| BenchError::Write {
            path: results.to_owned(),
            source,
        })?;
        println!("\n{}", self.markdown(None));
        let json_path = results.join(format!("{}.json", self.scenario));
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| BenchError::Setup(format!("results: {e}")))?;
        write_file(&json_path, json + "\n")?;
        let plot_name = format!("{}.svg", self.scenario);
        let plotted = self.plot(&results.join(&plot_name));
        if let Err(err) = &plotted {
            eprintln!("no plot: {err}");
        }
        let md_path = results.join(format!("{}.md", self.scenario));
        write_file(
            &md_path,
            self.markdown(plotted.is_ok().then_some(plot_name.as_str())),
        )?;
        println!(
            "results: {} (and {}.md, {}.svg)",
            json_path.display(),
            self.scenario,
            self.scenario
        );
        Ok(json_path)
    }

    /// Latency by percentile, one line per measurement that has latencies, on a scale that
    /// spreads the tail (x = log10(1 / (1 − p))).
    pub(super) fn plot(&self, path: &Path) -> Result<(), String> {
        let series: Vec<&Measurement> = self.measurements.iter().filter(|m| m.calls > 0).collect();
        if series.is_empty() {
            return Err("nothing to plot".into());
        }
        let x_of = |p: f64| (1.0 / (1.0 - (p / 100.0).min(0.9999))).log10();
        let y_max = series
            .iter()
            .flat_map(|m| m.percentiles.iter().map(|pair| pair[1]))
            .fold(0.0_f64, f64::max)
            .max(0.001)
            * 1.1;
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("mesh bench {}: latency by percentile", self.scenario),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x_of(50.0)..x_of(99.99), 0.0..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(5)
            .x_label_formatter(&|x| format!("{}", 100.0 - 100.0 / 10f64.powf(*x)))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, m) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    m.percentiles
                        .iter()
                        .filter(|pair| pair[0] < 100.0)
                        .map(|pair| (x_of(pair[0]), pair[1])),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(m.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn write_file(path: &Path, contents: String) -> Result<(), BenchError> {
    std::fs::write(path, contents).map_err(|source| BenchError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::measure::Latencies;

    fn sample() -> Report {
        let mut latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let mut settings = serde_json::Map::new();
        settings.insert("concurrency".into(), 4.into());
        Report {
            schema: SCHEMA,
            scenario: "echo".into(),
            started_unix_s: 1,
            machine: Machine {
                cores: 2,
                os: "linux/x86_64".into(),
                server_threads: 2,
                client_threads: 2,
            },
            settings,
            measurements: vec![Measurement::new(
                "echo",
                &latencies,
                3,
                Duration::from_secs(2),
            )],
            figures: vec![
                Figure::at_least("ratio", 0.25, "ratio", 0.2),
                Figure::at_most("spread", 5.0, "ratio", 4.0),
            ],
            notes: vec!["a note".into()],
        }
    }

    /// The JSON has the documented fields with the documented types; a change here is a
    /// change of [`SCHEMA`].
    #[test]
    fn json_schema() {
        let value = serde_json::to_value(sample()).expect("serializes");
        assert_eq!(value["schema"], "mesh-bench/1");
        assert_eq!(value["scenario"], "echo");
        assert_eq!(value["machine"]["cores"], 2);
        assert_eq!(value["settings"]["concurrency"], 4);
        let m = &value["measurements"][0];
        assert_eq!(m["name"], "echo");
        assert_eq!(m["calls"], 100);
        assert_eq!(m["errors"], 3);
        assert_eq!(m["per_second"], 50.0);
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(m["latency_ms"][key].is_f64(), "{key}");
        }
        let percentiles = m["percentiles"].as_array().expect("array");
        assert_eq!(percentiles.len(), crate::bench::measure::PERCENTILES.len());
        assert_eq!(percentiles[0][0], 50.0);
        let f = &value["figures"];
        assert_eq!(
            (f[0]["met"].as_bool(), f[1]["met"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(f[0]["goal"], "≥ 0.200");
        assert_eq!(value["notes"][0], "a note");
    }

    /// Writing makes the JSON, the Markdown (which shows the plot) and an SVG plot.
    #[test]
    fn writes_all_three() {
        let dir = tempfile::tempdir().expect("temp dir");
        let report = sample();
        let json = report.write(dir.path()).expect("written");
        let parsed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("parses");
        assert_eq!(parsed["measurements"][0]["calls"], 100);
        let md = std::fs::read_to_string(dir.path().join("echo.md")).expect("md");
        assert!(md.contains("| echo | 50.0 | 3 |"), "{md}");
        assert!(md.contains("![latency by percentile](echo.svg)"));
        let svg = std::fs::read_to_string(dir.path().join("echo.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    }
}
