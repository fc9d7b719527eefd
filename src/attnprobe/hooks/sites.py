"""Names of what a backend can read or edit, uniform across backends.

Tensor layouts handed to reducers and edits (B = batch, T = query positions, S = key positions):

| site          | shape            | meaning                                                       |
|---------------|------------------|---------------------------------------------------------------|
| RESID_PRE     | (B, T, D)        | residual stream entering block l                              |
| RESID_POST    | (B, T, D)        | residual stream leaving block l (h_l in the spec)             |
| Q             | (B, H, T, d)     | queries after RoPE                                            |
| K, V          | (B, KV, S, d)    | keys after RoPE / values, before GQA repetition               |
| PATTERN       | (B, H, rows, S)  | softmax attention, delivered in chunks of query rows          |
| Z             | (B, T, H, d)     | per-head output before W_o                                     |
| ATTN_OUT      | (B, T, D)        | attention block output (after W_o)                            |
| MLP_OUT       | (B, T, D)        | MLP output                                                    |
"""
from enum import Enum


class Site(str, Enum):
    RESID_PRE = "resid_pre"
    RESID_POST = "resid_post"
    Q = "q"
    K = "k"
    V = "v"
    PATTERN = "pattern"
    Z = "z"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"


# TransformerLens-style hook names, used in messages and by the TransformerLens backend.
TL_NAMES = {
    Site.RESID_PRE: "blocks.{l}.hook_resid_pre",
    Site.RESID_POST: "blocks.{l}.hook_resid_post",
    Site.Q: "blocks.{l}.attn.hook_rot_q",
    Site.K: "blocks.{l}.attn.hook_rot_k",
    Site.V: "blocks.{l}.attn.hook_v",
    Site.PATTERN: "blocks.{l}.attn.hook_pattern",
    Site.Z: "blocks.{l}.attn.hook_z",
    Site.ATTN_OUT: "blocks.{l}.hook_attn_out",
    Site.MLP_OUT: "blocks.{l}.hook_mlp_out",
}
