"""mars_semvie: SemVIE, MARS's visual experts around a frozen Hugging Face causal LM.

See the package README. Public API:
- ``SemVIEForCausalLM`` (``from_llm``, ``from_pretrained``, ``save_pretrained``, ``generate``)
- ``load_llm``: a Hugging Face causal LM from a directory or a config
- ``mars_semvie.sampling``: guided sampling (CFG in one batch, top-k / top-p, KV cache on/off)
- ``mars_semvie.sequences``: the sequence layouts of training and generation
- ``MultimodalVocab`` and ``SPECIAL_TOKENS``: the id layout of the multimodal vocabulary
"""

from importlib.metadata import version as _version

from mars_semvie.model import KVCache, SemVIEConfig, SemVIEForCausalLM, SemVIEOutput, load_llm
from mars_semvie.sampling import sample_next
from mars_semvie.vocab import SPECIAL_TOKENS, MultimodalVocab

__version__ = _version("mars-semvie")

__all__ = [
    "KVCache",
    "MultimodalVocab",
    "SPECIAL_TOKENS",
    "SemVIEConfig",
    "SemVIEForCausalLM",
    "SemVIEOutput",
    "load_llm",
    "sample_next",
]
