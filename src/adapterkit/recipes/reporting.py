"""Training metrics where people look: TensorBoard, Weights & Biases (offline) or MLflow (a local
store), each through its own client when it is installed. The loop only calls `log` and `close`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import AdapterkitError

REPORTERS = ("none", "tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Reporter:
    """Logs nothing (--report-to none)."""

    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Reporter):
    def __init__(self, output: Path, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))
        self.writer.add_text("settings", "\n".join(f"{k}: {v}" for k, v in settings.items()))

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.close()


class WandB(Reporter):
    def __init__(self, output: Path, settings: dict):
        import wandb

        self.run = wandb.init(project="adapterkit", dir=str(output), mode="offline", config=settings)

    def log(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class MLflow(Reporter):
    def __init__(self, output: Path, settings: dict):
        import mlflow

        mlflow.set_tracking_uri((output / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        mlflow.start_run()
        mlflow.log_params({k: str(v)[:250] for k, v in settings.items()})

    def log(self, values, step):
        self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


def check_reporter(name: str) -> None:
    """Before any work: the chosen client must be installed."""
    package = _PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise AdapterkitError(f"--report-to {name} needs the {package} package, which is not installed: "
                              f"pip install {package} (or --report-to none)")


def make_reporter(name: str, output: Path, settings: dict) -> Reporter:
    check_reporter(name)
    kinds = {"none": Reporter, "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    return kinds[name]() if name == "none" else kinds[name](output, settings)
