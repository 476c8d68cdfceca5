//! Progress bars for long work (the golden image build), driven by the image
//! builder's `Progress` calls. Each stage's bar runs against an estimate taken
//! from the last real build, so the time shown is honest.

use airlock_image::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug)]
pub struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            current: Mutex::new(None),
        }
    }
}

fn style(estimated: bool) -> ProgressStyle {
    let template = if estimated {
        "{spinner} {prefix:<10} [{bar:30}] {elapsed:>4} of ~{len}s  {wide_msg}"
    } else {
        "{spinner} {prefix:<10} {elapsed:>4}  {wide_msg}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for Bars {
    fn stage(&self, name: &str, estimate: Option<Duration>) {
        let bar = match estimate {
            Some(est) => ProgressBar::new(est.as_secs().max(1)).with_style(style(true)),
            None => ProgressBar::new_spinner().with_style(style(false)),
        };
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        let ticker = bar.clone();
        std::thread::spawn(move || {
            while !ticker.is_finished() {
                std::thread::sleep(Duration::from_secs(1));
                let elapsed = ticker.elapsed().as_secs();
                // Past the estimate, hold the bar just short of full instead of lying.
                ticker.set_position(elapsed.min(ticker.length().unwrap_or(1).saturating_sub(1)));
            }
        });
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some(bar);
        }
    }

    fn message(&self, msg: &str) {
        if let Ok(cur) = self.current.lock() {
            if let Some(bar) = cur.as_ref() {
                bar.set_message(msg.to_owned());
            }
        }
    }

    fn done(&self, name: &str, took: Duration, cached: bool) {
        if let Ok(mut cur) = self.current.lock() {
            if let Some(bar) = cur.take() {
                let how = if cached {
                    "reused".to_owned()
                } else {
                    format!("{:.1}s", took.as_secs_f64())
                };
                bar.set_style(
                    ProgressStyle::with_template("✓ {prefix:<10} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_prefix(name.to_owned());
                bar.finish_with_message(how);
            }
        }
    }
}
