"""A tiny mlx-lm model directory written offline: random weights and a word-level tokenizer.

    write_model_dir("/tmp/tiny-llama")          # then: mlx_lm.generate --model /tmp/tiny-llama

For tests and docs: everything mlx-lm's ``load`` needs (config.json, model.safetensors via
mlx-lm's own ``save_model``/``save_config``, tokenizer.json + tokenizer_config.json that
``transformers.AutoTokenizer`` reads without network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

__all__ = ["WORDS", "write_model_dir"]

SPECIAL = ("<unk>", "<s>", "</s>")
WORDS = tuple("hi hello the a cat dog sat on mat and ran to big small red blue one two three is was".split())


def write_model_dir(path: Union[str, Path], arch: str = "llama", words: Sequence[str] = WORDS, seed: int = 4,
                    **overrides) -> Path:
    """Write a random-weight `arch` model with a word-level tokenizer over `words` to `path`.

    Args:
        path: the directory (created).
        arch (str): an mlx-lm architecture (``mlx_lm.models.<arch>``).
        words: the vocabulary after ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2; ``</s>`` is EOS).
        seed (int): weights' seed. The default gives varied greedy tokens for the default words.
        **overrides: `ModelArgs` fields (default: hidden 32, 2 layers; vocab = the tokenizer's).

    Returns:
        Path: `path`.
    """
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .spec import model_config, tiny_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    config = model_config(arch, **{"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                   **overrides})
    save_model(path, tiny_model(config, seed=seed))
    save_config({**config, "eos_token_id": vocab["</s>"]}, path / "config.json")
    return path
