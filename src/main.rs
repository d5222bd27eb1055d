//! The `emotiond` command line: parses arguments, sets up logging and signals, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use emotiond::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Camera streams in, per-frame emotion labels out over MQTT"
)]
struct Cli {
    /// TOML config file; without it, the built-in demo (bundled video, bundled model, embedded broker).
    /// `EMOTIOND__SECTION__KEY` environment variables override either.
    #[arg(long, short, global = true, env = "EMOTIOND_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT/SIGTERM (or until every non-looping camera has ended).
    Run,
    /// Classify one still image, video file or URI; print one JSON line per frame, as the daemon publishes.
    Classify {
        /// Image path, video path or URI (file://, rtsp://, http(s)://).
        input: String,
    },
    /// Check the config and every file it names; start nothing. Exit status 1 when invalid, 2 when the file
    /// cannot be read or parsed.
    Validate,
    /// Measure per-stage times and end-to-end frames/s and latency on a video; prints a table.
    Bench(emotiond::bench::BenchArgs),
    /// Measure a model on a labelled data set through the daemon's preprocessing and ONNX Runtime path.
    Eval(emotiond::eval::EvalArgs),
    /// Fine-tune EfficientNet on face-expression data and export the ONNX model the daemon serves.
    #[cfg(feature = "train")]
    Train(emotiond::train::TrainArgs),
    /// Average the weights of models fine-tuned from the same start into one (a model soup).
    #[cfg(feature = "train")]
    Soup(emotiond::train::soup::SoupArgs),
    /// Seconds per training step and images/s for B0 and Lite0 (a benchmark, not a test).
    #[cfg(feature = "train")]
    BenchTrain(emotiond::train::bench::BenchArgs),
}

fn main() -> ExitCode {
    // Microsoft's ONNX Runtime builds send usage telemetry unless told not to. Set before any thread exists.
    // SAFETY: nothing else runs yet, so no other thread can read the environment concurrently.
    unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            emotiond::telemetry::init_logging(Default::default(), "info");
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    emotiond::telemetry::init_logging(config.log.format, &config.log.level);
    let result = match cli.command {
        Command::Run => run(config, cli.config),
        Command::Classify { input } => {
            let stdout = std::io::stdout();
            emotiond::commands::classify(&config, &input, &mut stdout.lock()).map(|_| ())
        }
        Command::Validate => emotiond::commands::validate(&config).map(|msg| println!("{msg}")),
        Command::Bench(args) => emotiond::bench::run(&config, &args),
        Command::Eval(args) => emotiond::eval::run(args),
        #[cfg(feature = "train")]
        Command::Train(args) => emotiond::train::run(args),
        #[cfg(feature = "train")]
        Command::Soup(args) => emotiond::train::soup::run(args),
        #[cfg(feature = "train")]
        Command::BenchTrain(args) => emotiond::train::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let (mut term, mut int, mut hup) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        );
        let signals = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM received; shutting down."); break }
                    _ = int.recv() => { tracing::info!("SIGINT received; shutting down."); break }
                    _ = hup.recv() => { let _ = reload_tx.try_send(()); }
                }
            }
            signals.cancel();
        });
        let opts = emotiond::daemon::RunOptions {
            shutdown,
            reload: Some(reload_rx),
            config_path,
        };
        emotiond::daemon::run(config, opts).await?;
        Ok(())
    })
}
