//! Minimal dispatcher for the `train` branch (the daemon's `main.rs` on `main` wires the same calls).
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "emotiond",
    version,
    about = "Camera daemon: faces in, emotions out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a model on a labelled data set through the daemon's preprocessing and ort path.
    Eval(emotiond::eval::EvalArgs),
    /// Fine-tune EfficientNet on face-expression data and export model.onnx.
    #[cfg(feature = "train")]
    Train(emotiond::train::TrainArgs),
    /// Seconds per training step and images/s for B0 and Lite0 (benchmark, not a test).
    #[cfg(feature = "train")]
    BenchTrain(emotiond::train::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Eval(a) => emotiond::eval::run(a),
        #[cfg(feature = "train")]
        Command::Train(a) => emotiond::train::run(a),
        #[cfg(feature = "train")]
        Command::BenchTrain(a) => emotiond::train::bench::run(a),
    }
}
