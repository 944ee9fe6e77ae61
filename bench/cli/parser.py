"""The `smoothap-bench` argument parser: every command, its options and its help, and nothing else.

Handlers live in `bench.cli.commands`; the parser only names them, so `--help` answers without importing
torch, MLflow or Optuna.
"""

from __future__ import annotations

import argparse

from bench import layout
from bench.cli import commands as handlers
from bench.device import DEVICE_CHOICES
from bench.pipeline import QUICK_EXPERIMENT, QUICK_OVERRIDES

EPILOG = """examples:
  smoothap-bench run                                  # the main job on the bundled Omniglot data
  smoothap-bench train --config omniglot --loss smooth_ap --set optim.lr=3e-4
  smoothap-bench train --config omniglot --loss smooth_ap --resume   # continue an interrupted run
  smoothap-bench bench loss                           # Smooth-AP speed and memory against the \
B x B x B algorithm
"""
WIDEN_HELP = (
    "after tuning, retune each loss whose best value lies at an edge of its range (within 5%%, log scale for "
    "log-scaled parameters) over that range widened by FACTOR on the side it hit, on the same budget, "
    "in the study <experiment>-<loss>-widened; its final runs come from there (try 10)"
)
TRACKING_HELP = f"MLflow tracking URI (default: MLFLOW_TRACKING_URI, else {layout.MLFLOW_URI})"


def add_experiment_options(parser: argparse.ArgumentParser, loss: bool = True) -> None:
    """Options shared by every command that trains: config, overrides, seed, device, tracking."""
    parser.add_argument(
        "--config",
        default="omniglot",
        help="bundled config name (see bench/configs/) or path to a YAML file (default: omniglot)",
    )
    if loss:
        parser.add_argument("--loss", help="registry name of the loss (default: the config's loss.name)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
    parser.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    add_loss_module_option(parser)
    add_runtime_options(parser)


def add_loss_module_option(parser: argparse.ArgumentParser) -> None:
    """`--loss-module FILE`: losses from outside the package, on every command that builds or names one."""
    parser.add_argument(
        "--loss-module",
        dest="loss_modules",
        action="append",
        default=[],
        metavar="FILE",
        help="a Python file, anywhere, that registers a loss with losses.register(...); its losses join "
        "the registry before anything else runs (repeatable)",
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where to train and evaluate (default: auto = cuda when available)",
    )
    parser.add_argument(
        "--tracking-uri",
        help=f"{TRACKING_HELP}; put a server's password in MLFLOW_TRACKING_PASSWORD, not in the URI",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Where a report reads from: the MLflow store and the experiment's name in it."""
    parser.add_argument(
        "--experiment",
        default="omniglot",
        help="MLflow experiment to report on (the config's tracking.experiment; default: omniglot)",
    )
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_loss_module_option(parser)


WORKERS_HELP = (
    "tuning processes on this machine: one per GPU (CUDA_VISIBLE_DEVICES pinned), else CPU workers with the "
    "cores split between them; the same command on other machines with the same PostgreSQL --storage joins "
    "the same studies (default: 1)"
)


def _worker_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers, at least 1, got {text!r}")
    return int(text)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothap-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Train, tune and compare deep metric learning losses (Smooth-AP and baselines) "
        "on identical backbones, logged to MLflow.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train and evaluate one loss, print its test metrics",
        description="Train one run: config + loss + seed -> checkpoint, MLflow run, test metrics.",
    )
    add_experiment_options(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run from its last checkpoint (default path: "
        "<train.checkpoint_dir>/<experiment>/<loss>-seed<seed>/last.pt)",
    )
    train.set_defaults(handler=handlers.cmd_train)

    run = commands.add_parser(
        "run",
        help="the main job: tune all losses on equal budgets, final seeds, report (Omniglot by default)",
        description="Tune every loss (Optuna, equal budget, validation classes only), "
        "retrain each loss's best parameters with several seeds, test once, and write tables and figures "
        "to results/<experiment>/. Budgets come from the config's tune section; re-running continues "
        "where it stopped.",
    )
    add_experiment_options(run, loss=False)
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke-sized comparison in a few minutes: "
        + " ".join(QUICK_OVERRIDES)
        + f" (experiment {QUICK_EXPERIMENT})",
    )
    run.add_argument(
        "--experiment-name",
        help="name of the experiment, its MLflow experiment and its studies "
        "(default: the config's; with --quick: omniglot-quick)",
    )
    run.add_argument("--losses", help="comma-separated registry names (default: every registered loss)")
    run.add_argument("--storage", help="Optuna storage URL (default: the config's tune.storage)")
    run.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    run.add_argument("--workers", type=_worker_count, default=1, metavar="N", help=WORKERS_HELP)
    run.add_argument("--widen", type=float, metavar="FACTOR", help=WIDEN_HELP)
    run.add_argument("--out", help="report folder (default: results/<experiment>/)")
    run.set_defaults(handler=handlers.cmd_run)

    tune = commands.add_parser(
        "tune",
        help="Optuna study per loss on an equal budget, then final seeds",
        description="One study <experiment>-<loss> per loss (TPE, seeded; pruning on "
        "validation MAP@R), each to the same number of finished trials; then "
        "each loss's best setting retrained with S seeds and tested once. "
        "Re-run the same command to continue; start it several times to add "
        "workers (pass --no-final to all but one).",
    )
    add_experiment_options(tune, loss=False)
    tune.add_argument("--losses", help="comma-separated registry names (default: every registered loss)")
    tune.add_argument(
        "--trials", type=int, help="finished trials per loss (default: the config's tune.trials)"
    )
    tune.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="start no new trial after S seconds (losses take turns, so budgets stay level)",
    )
    tune.add_argument(
        "--storage",
        help="Optuna RDB URL (default: the config's tune.storage, "
        f"{layout.OPTUNA_STORAGE}; PostgreSQL for workers on several machines)",
    )
    tune.add_argument("--workers", type=_worker_count, default=1, metavar="N", help=WORKERS_HELP)
    tune.add_argument("--study-name", help="study name for a single loss (default: <experiment>-<loss>)")
    tune.add_argument(
        "--final-seeds", type=int, help="final seeds per loss (default: the config's tune.final_seeds)"
    )
    tune.add_argument("--no-final", action="store_true", help="tune only; skip the final seed runs")
    tune.add_argument("--widen", type=float, metavar="FACTOR", help=WIDEN_HELP)
    tune.set_defaults(handler=handlers.cmd_tune)

    ablation = commands.add_parser(
        "ablate",
        help="grid over one or two parameters x seeds, everything else fixed",
        description="Train every value (pair) of the swept parameter(s) with each seed; "
        "runs tagged stage=ablation. Finished cells are skipped on re-run.",
    )
    add_experiment_options(ablation)
    ablation.add_argument(
        "--param",
        required=True,
        help="config key to sweep, e.g. loss.temperature (= loss.params.temperature), "
        "data.batch_size, data.samples_per_class, model.embedding_dim",
    )
    ablation.add_argument("--values", required=True, help="comma-separated values, e.g. 0.001,0.01,0.1,1")
    ablation.add_argument("--param2", help="second swept key (a 2-D grid)")
    ablation.add_argument("--values2", help="values of --param2")
    ablation.add_argument(
        "--seeds", type=int, default=3, help="seeds per cell: train.seed, +1, ... (default: 3)"
    )
    ablation.set_defaults(handler=handlers.cmd_ablate)

    report = commands.add_parser(
        "report",
        help="comparison tables and figures from the MLflow and Optuna stores",
        description="Read the final, tuning and ablation runs of an experiment and write "
        "tables (Markdown, LaTeX, CSV) and figures (PNG, PDF).",
    )
    add_report_options(report)
    report.add_argument("--out", help="output folder (default: results/<experiment>/)")
    report.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the checkpoint behind the retrieval examples embeds the test split (default: cpu)",
    )
    report.add_argument(
        "--optuna-storage",
        default=layout.OPTUNA_STORAGE,
        help=f"Optuna storage holding the studies <experiment>-<loss> (default: {layout.OPTUNA_STORAGE})",
    )
    report.add_argument(
        "--allow-unfair",
        action="store_true",
        help="render a comparison whose fairness receipt is broken (losses at one seed with other initial "
        "weights or batches, or a tuning run that evaluated a test split); its tables are marked unfair",
    )
    report.set_defaults(handler=handlers.cmd_report)

    grad = commands.add_parser(
        "grad",
        help="gradient analysis: sigmoid vs step, |dL/ds| by rank, gradient norms",
        description="The paper's figure 2, where each loss spends its gradient along the "
        "ranking (initial and trained model), and the embedding-gradient norm "
        "over training; each figure with its data as CSV.",
    )
    add_report_options(grad)
    grad.add_argument("--out", help="output folder (default: results/<experiment>/grad/)")
    grad.add_argument("--seed", type=int, default=0, help="seed that draws the analysed batch (default: 0)")
    grad.set_defaults(handler=handlers.cmd_grad)

    sync = commands.add_parser(
        "sync",
        help="send what runs kept while the MLflow server was unreachable",
        description="Runs that could not reach their tracking server keep what they log in a spool folder. "
        "Send it, in order, to the server (each file names the server it was meant for); what a server "
        "still does not take stays for the next sync.",
    )
    sync.add_argument("--spool", help=f"the spool folder (default: {layout.RESULTS}/spool)", metavar="FOLDER")
    sync.add_argument(
        "--tracking-uri",
        help="send to this server instead of the one each file names (needed when that URL had a password)",
    )
    sync.set_defaults(handler=handlers.cmd_sync)

    data = commands.add_parser("data", help="dataset tools: check a dataset on disk")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser(
        "check",
        help="print classes and images per split, and every problem found",
        description="Read a dataset's official files, compare with the published counts "
        "and decode every image. Exit 1 when problems are found.",
    )
    check.add_argument(
        "name",
        help="dataset name (omniglot, sop, cub200, cars196, inshop, vehicleid, inaturalist, "
        "vggface2, folder)",
    )
    check.add_argument("--root", help="dataset folder (default: datasets/<name>)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.set_defaults(handler=handlers.cmd_data_check)

    bench = commands.add_parser("bench", help="speed and memory benchmarks, measured side by side in one run")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    loss = bench_commands.add_parser(
        "loss",
        help="forward+backward time and peak memory of every loss, ratios to our Smooth-AP",
        description="For each batch size (4 samples per class, D=512): our Smooth-AP (on CUDA also its "
        "torch and Triton backends side by side), the released code's B x B x B algorithm (where it fits), "
        "pytorch-metric-learning's SmoothAPLoss and the other losses, each case in its own process.",
    )
    loss.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=(224, 384, 1024, 4096, 8192),
        help="comma-separated batch sizes (default: 224,384,1024,4096,8192)",
    )
    loss.add_argument("--samples-per-class", type=int, default=4)
    loss.add_argument("--dim", type=int, default=512, help="embedding size (default: 512)")
    loss.add_argument(
        "--losses",
        help="comma-separated subset: registry names, smooth_ap_bbb (released B x B x B algorithm), "
        "smooth_ap_pml, smooth_ap_torch and smooth_ap_triton (ours with that backend; both are in the "
        "default on CUDA) (default: all)",
    )
    loss.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="at least this many timed passes per case; the fastest counts (default: 3)",
    )
    loss.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a case until its passes add up to this many seconds, as timeit does, "
        "so fast cases get enough passes to find an undisturbed one (default: 1)",
    )
    loss.add_argument("--threads", type=int, help="torch threads per case (default: torch's own)")
    loss.add_argument(
        "--max-bbb-gb",
        type=float,
        default=4.0,
        help="skip the B x B x B algorithm where it would need more memory (default: 4)",
    )
    loss.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    loss.set_defaults(handler=handlers.cmd_bench_loss)
    evaluation = bench_commands.add_parser(
        "eval",
        help="our retrieval metrics against pytorch-metric-learning's AccuracyCalculator",
        description="Random normalised embeddings of the SOP test size, evaluated by both in one run: "
        "time, speed ratio and agreement of precision@1, MAP@R and R-precision.",
    )
    evaluation.add_argument(
        "--n", type=int, default=60502, help="embeddings (default: 60,502, SOP's test set)"
    )
    evaluation.add_argument("--classes", type=int, default=11316, help="classes (default: 11,316)")
    evaluation.add_argument("--dim", type=int, default=512)
    evaluation.add_argument(
        "--backend",
        default="auto",
        metavar="BACKEND[@DEVICE],...",
        help="where ours runs, one row each: BACKEND auto, faiss or torch; DEVICE cpu (default) or cuda, "
        "where the embeddings live and the search runs (faiss on cuda needs the gpu extra); the first is the "
        "reference for speed-ups, e.g. faiss@cpu,torch@cuda,faiss@cuda (default: auto)",
    )
    evaluation.add_argument(
        "--memory-check",
        action="store_true",
        help="also evaluate 136,093 x 512 (iNaturalist's test size) at each placement and report peak memory",
    )
    evaluation.set_defaults(handler=handlers.cmd_bench_eval)
    data_bench = bench_commands.add_parser(
        "data",
        help="images/s of a dataset's loading pipeline",
        description="Decode, transform and batch images as training does.",
    )
    source = data_bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="bundled config name whose data section to use (e.g. sop)")
    source.add_argument(
        "--synthetic", action="store_true", help="a generated folder of JPEGs, no download needed"
    )
    data_bench.add_argument("--root", help="dataset folder (default: the config's data.root)")
    data_bench.add_argument("--workers", type=int, help="DataLoader workers (default: the config's)")
    data_bench.add_argument("--batch-size", type=int, help="images per batch (default: the config's)")
    data_bench.add_argument("--batches", type=int, default=20, help="batches to time (default: 20)")
    data_bench.set_defaults(handler=handlers.cmd_bench_data)
    add_train_bench(bench_commands)
    return parser


def add_train_bench(bench_commands) -> None:
    """`bench train`: the plain and the gradient-cached training step side by side, over process counts and
    inputs (in memory, JPEGs decoded on the CPU or on the GPU)."""

    def names(*choices: str):
        def parse(text: str) -> tuple[str, ...]:
            picked = tuple(text.split(","))
            if not set(picked) <= set(choices):
                raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
            return picked

        return parse

    train = bench_commands.add_parser(
        "train",
        help="images/s, its split and peak memory of training steps, plain and chunked, on 1..N processes",
        description="Time training steps of a backbone on a synthetic P x K batch in memory or on JPEG files "
        "through the training DataLoader, the plain step and the gradient-cached one side by side, each case "
        "in a fresh torchrun launch (one process, or N with --nproc, training as `torchrun -m bench train` "
        "does). Reports images/s, the step split into data wait, to device, forward, loss, backward and "
        "optimizer, rank 0's peak memory, chunked / plain peak memory and N / 1 process images/s. The "
        "paper's recipe: --backbone resnet50 --image-size 224 --batch-size 384 --samples-per-class 4 "
        "--precision bf16 (see bench/benchmarks/train_bench.py for the full command).",
    )
    train.add_argument("--backbone", default="resnet18", help="model.backbone (default: resnet18)")
    train.add_argument("--image-size", type=int, default=64, help="side of the images (default: 64)")
    train.add_argument("--batch-size", type=int, default=1024, help="global batch P x K (default: 1024)")
    train.add_argument("--samples-per-class", type=int, default=4, help="K (default: 4)")
    train.add_argument(
        "--chunk-size", type=int, default=64, help="train.chunk_size of the chunked step (default: 64)"
    )
    train.add_argument("--loss", default="smooth_ap", help="registry name of the loss (default: smooth_ap)")
    train.add_argument("--embedding-dim", type=int, default=128, help="model.embedding_dim (default: 128)")
    train.add_argument(
        "--train-bn",
        action="store_true",
        help="BatchNorm in training mode (default: frozen, the paper's recipe)",
    )
    train.add_argument(
        "--nproc",
        type=_int_list,
        default=(1,),
        help="comma-separated process counts, e.g. 1,2 for the scaling from one process to two (default: 1)",
    )
    train.add_argument("--steps", type=int, default=3, help="timed steps per case (default: 3)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default: 1)")
    train.add_argument(
        "--threads", type=int, help="torch threads shared out among a case's processes (default: all cores)"
    )
    train.add_argument("--timeout", type=float, default=1800.0, help="seconds per case (default: 1800)")
    train.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    train.add_argument(
        "--decode",
        type=names("memory", "cpu", "gpu"),
        default=("memory",),
        help="comma-separated inputs, one row each: memory (a random batch already in memory), cpu or gpu "
        "(synthetic JPEGs through the DataLoader, data.decode cpu or gpu) (default: memory)",
    )
    train.add_argument(
        "--jpeg-images", type=int, default=512, help="distinct JPEG files for cpu and gpu (default: 512)"
    )
    train.add_argument(
        "--jpeg-side", type=int, default=500, help="JPEG width; height is 3/4 of it (default: 500)"
    )
    train.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers shared out among a case's processes (default: all cores)",
    )
    train.add_argument(
        "--modes",
        type=names("plain", "chunked"),
        default=("plain", "chunked"),
        help="comma-separated steps to time: plain, chunked (default: both)",
    )
    train.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16 autocast (train.amp, CUDA only) or fp32 (default: bf16)",
    )
    train.set_defaults(handler=handlers.cmd_bench_train)
