"""Token counts of a request from the tiling rule and the tokenizer alone (no weights, no pixels).

Latency is composed from token counts (vision, prompt, layout, output), so the composer must know
them for a model that it does not load: `TokenCounter.for_preset("molmoe-1b")` needs only the
preset's sizes and its shipped tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.args import ModelArgs, preset_args
from ..model.preprocess import select_tiling, token_layout
from ..model.tokenizer import TextTokenizer


@dataclass(frozen=True)
class TokenCounter:
    args: ModelArgs
    tokenizer: TextTokenizer

    @classmethod
    def for_preset(cls, preset: str) -> "TokenCounter":
        from ..model.runtime import assets_dir

        return cls(preset_args(preset), TextTokenizer.from_file(assets_dir(preset)))

    @classmethod
    def for_model(cls, vlm) -> "TokenCounter":
        return cls(vlm.args, vlm.tokenizer)

    def request(self, image_size_px: tuple[int, int], prompt: str, crops: int, crop_rule: str = "exact") -> dict:
        """{vision, prompt, layout, input}_tokens of a request with an image of (width, height) px."""
        width, height = image_size_px
        rows, cols = select_tiling(height, width, crops, self.args.vision, crop_rule)
        layout, idx = token_layout(rows, cols, self.args.vision, self.tokenizer.special, offset=1)
        vision = int((idx >= 0).sum())
        prompt_tokens = len(self.tokenizer.encode_prompt(prompt))
        return {
            "vision_tokens": vision,
            "prompt_tokens": prompt_tokens,
            "layout_tokens": 1 + len(layout) - vision,  # BOS and the layout tokens around the features
            "input_tokens": 1 + len(layout) + prompt_tokens,
        }

    def output_tokens(self, answers, max_new_tokens) -> list[int]:
        """Tokens a model with this tokenizer generates to write each answer: its tokens plus EOS,
        capped at the request's budget (a capped answer has no EOS). The prompt ends with
        "Assistant:", so the answer starts with a space, which decoding strips."""
        encoded = self.tokenizer.tokenizer.encode_batch([" " + str(a) if str(a) else "" for a in answers], add_special_tokens=False)
        return [min(len(e.ids) + 1, int(m)) for e, m in zip(encoded, max_new_tokens)]
