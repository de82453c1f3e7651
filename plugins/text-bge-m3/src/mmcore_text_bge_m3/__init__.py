"""BGE-M3 dense embeddings for mmcore: the ``bge_m3`` text encoder (1024-d).

BGE-M3's dense vector is the final hidden state of the first token (CLS) of its
XLM-RoBERTa-large encoder, L2-normalized. It loads through transformers ``AutoModel`` +
``AutoTokenizer``; the shared frozen, batched encoding lives in :mod:`mmcore.kit.text`.
"""

from functools import partial

import attrs

from mmcore import TextEncoderParams, TextModelSpec, build_text_encoder, hookimpl, hub_weights

HUB_IDS = {"bge_m3": "BAAI/bge-m3"}

SPEC = TextModelSpec(
    name="bge_m3", hub_id=HUB_IDS["bge_m3"], family="xlm-roberta", pooling="cls",
    backend="transformers",
    config=dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                num_attention_heads=16, intermediate_size=4096, max_position_embeddings=8194,
                type_vocab_size=1, layer_norm_eps=1e-5),
)


@attrs.frozen(kw_only=True)
class BgeM3Params(TextEncoderParams):
    """BGE-M3 takes up to 8192 tokens; ``max_length`` defaults to 512, plenty for OCR text
    and much cheaper (attention cost grows with the square of the length)."""


def build_bge_m3(params):
    return build_text_encoder(SPEC, params)


@hookimpl
def register_text_encoders(register):
    register("bge_m3", build_bge_m3, BgeM3Params,
             weights=partial(hub_weights, default_id=HUB_IDS["bge_m3"]))
