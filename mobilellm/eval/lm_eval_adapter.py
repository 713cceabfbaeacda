"""lm-evaluation-harness model `mobilellm`: our checkpoints (full precision or quantized) under lm-eval.

    lm_eval --model mobilellm --model_args pretrained=FOLDER --include_path DIR --tasks TASK
    lm_eval --model mobilellm --model_args pretrained=INT4_FOLDER,tokenizer=FOLDER --include_path DIR --tasks TASK

The scoring is our own (shared-prefix batches, the infer engine's KV cache for generation); lm-eval
does the tokenization split (`TemplateLM._encode_pair`), the prompts and the metrics. How the `lm_eval`
command finds this class is in `lm_eval_hook.py`.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..dtypes import parse_dtype
from .lm import EvalLM
from .loglik import TokenRequest

@register_model("mobilellm")
class MobileLLMAdapter(TemplateLM):
    backend = "causal"

    def __init__(self, pretrained: str, dtype: str = "float32", batch_tokens: int = 2048, max_gen_toks: int = 256,
                 tokenizer: str | None = None, **lm_eval_options):
        # lm-eval also passes batch_size, max_batch_size and device: we batch by tokens, on the CPU.
        super().__init__()
        self.lm = EvalLM.load(pretrained, dtype=parse_dtype(dtype), tokenizer=tokenizer, batch_tokens=int(batch_tokens),
                              progress=False)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_eval_lm(cls, lm: EvalLM, max_gen_toks: int = 256) -> "MobileLLMAdapter":
        """Wrap a model already in memory (e.g. one just quantized)."""
        adapter = cls.__new__(cls)
        TemplateLM.__init__(adapter)
        adapter.lm, adapter.max_gen_toks = lm, max_gen_toks
        return adapter

    @property
    def eot_token_id(self) -> int:
        return self.lm.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.lm.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lm.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.lm.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: [((context, continuation), context_ids, continuation_ids)]
        return self.lm.loglikelihood_tokens([TokenRequest(tuple(c), tuple(x)) for _, c, x in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint windows of max_length tokens, each conditioned on the token before it."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self.lm.loglikelihood_tokens([TokenRequest(tuple(c), tuple(x)) for c, x in windows])
            results.append(sum(ll for ll, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (sampling arguments are ignored: evaluation here is deterministic)."""
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate"):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            outputs.append(self.lm.generate_until(context, until, max_new))
        return outputs
