"""The engine knows interfaces, not model families: no file under actors/, net/, apps/ or messages/ names a
module or class of a pipeline family (docs/architecture.md). Module lists, registries, offload and
placement come from pipeline::diffusion_pipeline; a family is added under pipeline/ alone.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("actors", "net", "apps", "messages")
# Module and class names of the families refit serves (FLUX.2-klein), as whole words.
FAMILY_WORDS = re.compile(r"\b(text_encoder|transformer|vae|tokenizer|Flux2\w*|flux2\w*|FLUX\w*|Klein\w*|klein\w*|Qwen\w*|qwen\w*|"
                          r"AutoencoderKL\w*)\b")


def test_layers_above_the_pipeline_name_no_family_module_or_class():
    hits = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*")):
            if path.suffix not in (".cpp", ".hpp", ".txt") or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in FAMILY_WORDS.finditer(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)}: {line.strip()}")
    assert not hits, "family names above pipeline/:\n" + "\n".join(hits)


def test_the_check_finds_a_family_name():
    assert FAMILY_WORDS.search('if (module == "transformer")')
    assert FAMILY_WORDS.search("pipeline::flux2_klein_pipeline")
    assert not FAMILY_WORDS.search('{"transformer_calls", r.teacache_calls}')  # an API field, not a module
