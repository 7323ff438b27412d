"""Identity conditioning: ArcFace vectors -> Arc2Face's CLIP encoder output (+ domain shift).

Arc2Face reads the prompt ``photo of a id person`` and replaces the input token embedding at
the ``id`` token with the ArcFace vector zero-padded to the encoder width. Arc2Face's own
wrapper re-implements the CLIP text transformer's forward and breaks across transformers
majors; here a forward hook on the encoder's input-embedding layer
(``get_input_embeddings()``, public API on transformers 4 and 5) swaps the rows, so the rest of
the encoder runs unmodified — the same tensor on both majors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digi2real.data.embeddings import check_embeddings

if TYPE_CHECKING:
    from digi2real.pipeline.domain_shift import DomainShift
    from digi2real.weights import WeightsDir

logger = logging.getLogger(__name__)

ID_PROMPT = "photo of a id person"
ID_TOKEN = "id"


class IdentityEncoder:
    """Batched ``(N, d)`` unit ArcFace vectors -> ``(N, 77, D)`` conditioning.

    ``shift`` (a :class:`~digi2real.pipeline.domain_shift.DomainShift`) is applied to the identity
    conditioning only; :meth:`encode_empty` (the classifier-free-guidance branch) never is.
    """

    def __init__(
        self,
        text_encoder: Any,
        tokenizer: Any,
        *,
        id_dim: int,
        digest: str = "",
        shift: DomainShift | None = None,
    ) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.hidden_size = int(text_encoder.config.hidden_size)
        if not 0 < id_dim <= self.hidden_size:
            raise ValueError(
                f"identity width {id_dim} must be in 1..{self.hidden_size} (the encoder width)"
            )
        self.id_dim = int(id_dim)
        self.digest = digest
        self.shift = shift
        ids = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits {ID_TOKEN!r} into {ids}; expected one token")
        self.id_token_id = int(ids[0])
        self.input_ids = tokenizer(
            ID_PROMPT,
            truncation=True,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self.id_positions = (self.input_ids[0] == self.id_token_id).nonzero().flatten()
        if self.id_positions.numel() != 1:
            raise ValueError(f"prompt {ID_PROMPT!r} must hold the id token exactly once")
        self.empty_ids = tokenizer(
            "",
            padding="max_length",
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        self._pending: torch.Tensor | None = None
        self._empty_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        text_encoder.get_input_embeddings().register_forward_hook(self._inject)

    @classmethod
    def from_weights(
        cls,
        weights: WeightsDir,
        *,
        id_dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        shift: DomainShift | None = None,
    ) -> IdentityEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(weights.tokenizer)
        encoder = CLIPTextModel.from_pretrained(weights.encoder, torch_dtype=dtype).to(device)
        return cls(
            encoder, tokenizer, id_dim=id_dim, digest=weights.file_digest("encoder"), shift=shift
        )

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def sequence_shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[1]), self.hidden_size)

    def _inject(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            return output
        output = output.clone()
        output[:, self.id_positions] = self._pending.to(output.dtype).unsqueeze(1)
        return output

    @contextmanager
    def _injecting(self, padded: torch.Tensor) -> Iterator[None]:
        self._pending = padded
        try:
            yield
        finally:
            self._pending = None

    def check_ids(self, id_embeds: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = (
            id_embeds.detach().cpu().numpy() if isinstance(id_embeds, torch.Tensor) else id_embeds
        )
        array = check_embeddings(np.asarray(array), name="id_embeds")
        if array.shape[1] != self.id_dim:
            raise ValueError(
                f"id_embeds have width {array.shape[1]}, this profile's recognizer gives {self.id_dim}"
            )
        return torch.from_numpy(np.array(array, dtype=np.float32))  # owned, writable copy

    @torch.no_grad()
    def encode(
        self, id_embeds: np.ndarray | torch.Tensor, *, apply_shift: bool = True
    ) -> torch.Tensor:
        """(N, d) unit vectors -> (N, T, D) conditioning on the encoder's device/dtype."""
        ids = self.check_ids(id_embeds)
        padded = torch.nn.functional.pad(ids, (0, self.hidden_size - self.id_dim))
        padded = padded.to(self.device)
        input_ids = self.input_ids.to(self.device).expand(len(ids), -1)
        with self._injecting(padded):
            cond = self.text_encoder(input_ids=input_ids)[0]
        if apply_shift and self.shift is not None:
            cond = self.shift.apply(cond)
        return cond

    def clear_cache(self) -> None:
        """Forget cached outputs (after the encoder moved to another device or dtype)."""
        self._empty_cache.clear()

    @torch.no_grad()
    def encode_empty(self) -> torch.Tensor:
        """(1, T, D) conditioning of the empty prompt (the unconditional branch)."""
        key = (self.device, self.dtype)
        if key not in self._empty_cache:
            self._empty_cache[key] = self.text_encoder(input_ids=self.empty_ids.to(self.device))[0]
        return self._empty_cache[key]
