"""Fast evaluation of one encoder whose weights are rewritten in place for every setting."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping

import torch

from tallmasks.algebra.coefficients import KeyScaling, key_coefficient, scaling_of
from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.core.precision import PRECISIONS, check_precision, precision_context  # noqa: F401  (re-exported)
from tallmasks.eval.cache import SplitData
from tallmasks.eval.distributed import DistInfo

log = logging.getLogger(__name__)


class Evaluator:
    """Holds theta_0 and a merged vector on the device; sets ``theta_0 + alpha * (mask * tau)`` in place."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        theta0: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        batch_size: int = 128,
        dist: DistInfo | None = None,
    ):
        check_precision(precision)
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = precision
        self.batch_size = int(batch_size)
        self.dist = dist or DistInfo()
        self.encoder = encoder.to(self.device).eval()
        state = self.encoder.state_dict(keep_vars=True)
        missing = sorted(set(state) - set(theta0))
        extra = sorted(set(theta0) - set(state))
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected key {extra[0]!r}"
            raise CheckpointError(f"pre-trained checkpoint does not fit the image encoder: it {what}")
        self.targets: dict[str, torch.Tensor] = {}
        self.theta0: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, target in state.items():
                source = theta0[key]
                if tuple(source.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"pre-trained checkpoint: shape of {key!r} is {list(source.shape)}, the encoder expects {list(target.shape)}"
                    )
                target.data.copy_(source.to(target.dtype))
                self.targets[key] = target.data
                if target.dtype.is_floating_point:
                    self.theta0[key] = target.data.clone()
        self.vector: dict[str, torch.Tensor] = {}
        self.scaling: KeyScaling | None = None
        self.setting: tuple | None = None
        mean = getattr(encoder, "mean", (0.0, 0.0, 0.0))
        std = getattr(encoder, "std", (1.0, 1.0, 1.0))
        # x = (u8 / 255 - mean) / std  ==  u8 * scale + shift
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.heads: dict[str, torch.nn.Module] = {}

    # -- weights ------------------------------------------------------------------------------

    def load_vector(self, vector: Mapping[str, torch.Tensor]) -> None:
        """Keep the merged task vector on the device (float32)."""
        unknown = sorted(set(vector) - set(self.theta0))
        if unknown:
            raise CheckpointError(f"merged vector has key {unknown[0]!r} that the encoder lacks")
        self.vector = {k: v.to(self.device, torch.float32) for k, v in vector.items()}
        self.scaling = scaling_of(vector)  # a ScaledVector's per-key coefficients
        self.setting = None

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Encoder weights := ``state`` (a whole checkpoint, e.g. one fine-tuned model); theta_0 is kept."""
        missing = sorted(set(self.targets) - set(state))
        if missing:
            raise CheckpointError(f"checkpoint lacks key {missing[0]!r} of the image encoder")
        for key, target in self.targets.items():
            source = state[key]
            if tuple(source.shape) != tuple(target.shape):
                raise CheckpointError(f"checkpoint: shape of {key!r} is {list(source.shape)}, the encoder expects {list(target.shape)}")
            target.copy_(source.to(target.dtype))
        self.setting = None

    @torch.no_grad()
    def set_weights(self, alpha: float, mask: Mapping[str, torch.Tensor] | None = None, tag: object = None) -> None:
        """Encoder weights := theta_0 + alpha * (mask * tau), in place (``tag`` skips a repeat of the same setting);
        a ScaledVector's keys take their own coefficient at alpha."""
        setting = (float(alpha), tag if mask is not None else None)
        if tag is not None and setting == self.setting:
            return
        for key, base in self.theta0.items():
            target = self.targets[key]
            target.copy_(base)
            tau = self.vector.get(key)
            coefficient = key_coefficient(self.scaling, key, alpha)
            if tau is None or coefficient == 0:
                continue
            if mask is not None:
                tau = tau * mask[key].to(self.device, torch.bool)
            target.add_(tau.to(target.dtype) * coefficient)  # product rounded, then added (as theta_0 + alpha * tau)
        self.setting = setting if tag is not None else None

    # -- evaluation -----------------------------------------------------------------------------

    def set_head(self, dataset: str, head: torch.nn.Module) -> None:
        self.heads[dataset] = head.to(self.device).eval()

    def _batches(self, data: SplitData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches, moved to the device (pinned, non-blocking, one batch ahead)."""
        n = len(data)
        num_batches = math.ceil(n / self.batch_size)
        indices = list(self.dist.my_batches(num_batches))
        on_device = data.images.device.type == self.device.type and data.images.device.type != "cpu"
        if on_device or self.device.type != "cuda":
            for b in indices:
                sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
                yield data.images[sl].to(self.device), data.labels[sl].to(self.device)
            return
        # CUDA: a worker thread copies slices of the memory map into pinned buffers
        ready: queue.Queue = queue.Queue(maxsize=3)

        def produce() -> None:
            try:
                for b in indices:
                    sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
                    ready.put((data.images[sl].pin_memory(), data.labels[sl].pin_memory()))
            except BaseException as exc:  # surface in the consumer
                ready.put(exc)
                return
            ready.put(None)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            images, labels = item
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        worker.join()

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        return (images_u8.to(torch.float32).div_(255.0) - self.mean) / self.std

    @torch.no_grad()
    def count_correct(self, dataset: str, data: SplitData) -> tuple[int, int]:
        """(correct, total) over the whole split, summed over ranks."""
        head = self.heads[dataset]
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        total = 0
        with precision_context(self.precision, self.device):
            for images, labels in self._batches(data):
                logits = head(self.encoder(self.normalize(images)))
                correct += (logits.argmax(dim=1) == labels).sum()
                total += int(labels.shape[0])
        c, t = self.dist.sum([int(correct), total], self.device)
        return c, t
