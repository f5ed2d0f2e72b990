"""transformers integration: the `quant_method: "lplr-convert"` quantization config and HfQuantizer, so that
`AutoModel.from_pretrained(DST)` (and AutoModelForCausalLM, SentenceTransformer, pipelines) load a converted directory
with the factored layers built before the weights load, equal to `lplr_convert.load_model(DST, factored=True)`.

`import lplr_convert` does not import transformers: it registers these classes when transformers imports its
quantizer registry (`transformers.quantizers.auto`), or at once if that is already imported (see `_hook`).
"""

from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import constants as C
from ..errors import LplrError

__all__ = ["LplrConvertConfig", "LplrConvertHfQuantizer", "register"]


class LplrConvertConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a converted directory (what convert writes), plus two loading
    attributes a caller may pass as `from_pretrained(DST, quantization_config=LplrConvertConfig(...))`:
    `dequantize=True` loads float modules (LowRankLinear for factored weights, dense ones otherwise: what
    `load_model(DST, packed=False)` gives) instead of the packed runtime modules; `kernel` picks the packed modules'
    kernel ("auto", "tiled", "int4pack", "int8pack"; default $LPLR_KERNEL or "auto")."""

    def __init__(self, format_version: str = C.FORMAT_VERSION, manifest: str = C.MANIFEST_FILE,
                 method: str | None = None, dequantize: bool = False, kernel: str | None = None, **kwargs):
        self.quant_method = C.QUANT_METHOD
        self.format_version, self.manifest, self.method = str(format_version), manifest, method
        self.dequantize, self.kernel = bool(dequantize), kernel

    def get_loading_attributes(self) -> dict:
        return {"dequantize": self.dequantize, "kernel": self.kernel}

    def to_dict(self) -> dict:
        return {"quant_method": C.QUANT_METHOD, "format_version": self.format_version, "manifest": self.manifest,
                "method": self.method}


class LplrConvertHfQuantizer(HfQuantizer):
    """Loads an lplr-convert output inside `from_pretrained`: checks the manifest and every shard's sha256, puts a
    meta-device LowRankLinear in place of each factored linear, and decodes the stored parts (bit-packed codes +
    scales) into its factors, or into dense weights for rtn and for weights that are not a linear."""

    requires_calibration = True  # it only loads conversions; it quantizes nothing

    def __init__(self, quantization_config, **kwargs):
        if not hasattr(HfQuantizer, "update_weight_conversions"):  # transformers 4 loads weights another way
            raise LplrError("from_pretrained of lplr-convert outputs needs transformers 5 (tested with 5.24); upgrade "
                            "transformers or use lplr_convert.load_model")
        if not kwargs.get("pre_quantized", True):
            raise LplrError("quantization_config=LplrConvertConfig() converts nothing; convert the checkpoint with "
                            "lplr-convert first and load its output directory")
        super().__init__(quantization_config, **kwargs)
        major = str(quantization_config.format_version).split(".")[0]
        if major != C.FORMAT_VERSION.split(".")[0]:
            raise LplrError(f"this model has lplr-convert format {quantization_config.format_version}, this "
                            f"lplr-convert reads {C.FORMAT_VERSION}; upgrade lplr-convert or re-convert")
        self.plan = None

    def validate_environment(self, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise LplrError("device_map with 'disk' offload is not supported for lplr-convert models; use devices "
                            "and 'cpu' only (the factors are small), or lplr-convert decompress")

    def update_attn_implementation(self, config):
        # The first hook that sees the config before transformers looks for weight files: drop the guard that makes
        # plain transformers (without this package) fail on a missing file instead of loading random weights.
        if getattr(config, C.CONFIG_WEIGHTS_KEY, None) == C.IMPORT_GUARD_FILE:
            delattr(config, C.CONFIG_WEIGHTS_KEY)
        return config

    def preprocess_model(self, model, dtype=None, **kwargs):
        self.load_dtype = dtype  # what transformers loads in: it decides which modules stay in float32 (T5's wo)
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..runtime.modules import check_kernel
        from .converters import LoadPlan, converted_root

        config = self.quantization_config
        packed = not getattr(config, "dequantize", False)
        kernel = check_kernel(getattr(config, "kernel", None)) if packed else None
        root = converted_root(checkpoint_files, getattr(model.config, "name_or_path", None))
        self.plan = LoadPlan.build(model, root, checkpoint_files, getattr(self, "load_dtype", None), packed, kernel)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        from .converters import CopiedConverter, PartsConverter, wrap_model_converters

        self.plan.learn_renamings(weight_conversions, model)
        return [*wrap_model_converters(self.plan, weight_conversions), PartsConverter(self.plan),
                CopiedConverter(self.plan)]

    def get_new_dtype(self, converter, param, dtype):
        from .converters import CopiedConverter, DecodeFirst, PartsConverter

        if isinstance(converter, (PartsConverter, DecodeFirst, CopiedConverter)):
            return None  # codes, scales and copied tensors arrive as stored; decoding casts to the parameter's dtype
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..runtime.modules import PackedLinear, balance, log_kernel_counts
        from .modeling import LowRankLinear

        missing = self.plan.unloaded()
        if missing:
            raise LplrError(f"{len(missing)} compressed tensor(s) of {self.plan.output.root} found no place in "
                            f"{type(model).__name__} (e.g. {missing[0]}); load it with lplr_convert.load_model")
        for module in model.modules():
            if isinstance(module, (LowRankLinear, PackedLinear)):
                module.requires_grad_(False)
        self.plan.output.close()
        balance(model)
        log_kernel_counts(model)
        return model

    def remove_quantization_config(self, model):
        """transformers drops the quantizer of a model loaded with `dequantize=True`; ours stays attached, since the
        float modules (LowRankLinear) are still no plain checkpoint: save_pretrained keeps refusing, and the config
        keeps saying where the model came from."""
        return

    def is_serializable(self, **kwargs) -> bool:
        return False  # save with lplr-convert (or write a plain checkpoint with `lplr-convert decompress`)

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers under quant_method "lplr-convert" (idempotent), and let a
    config passed to from_pretrained set the loading attributes (`dequantize`, `kernel`) as transformers does for its
    own quantizers that have them (Mxfp4Config(dequantize=True))."""
    from transformers.quantizers import auto

    if LplrConvertConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, LplrConvertConfig)
    if C.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(C.QUANT_METHOD)(LplrConvertConfig)
    if C.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(C.QUANT_METHOD)(LplrConvertHfQuantizer)


register()  # importing this module directly (before the hook saw the registry) registers too
