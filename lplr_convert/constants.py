"""Every name this tool writes to disk, and the format version. Nothing else in the package spells these strings."""

from __future__ import annotations

FORMAT_VERSION = "1.0"
# An output with a record whose stored matrices are in a transformed basis (--incoherence) is written as 2.0, so
# that a tool that reads only 1.x refuses it instead of decoding the rotated weights; this tool reads both.
FORMAT_VERSION_TRANSFORMED = "2.0"
FORMAT_MAJORS_READ = ("1", "2")
QUANT_METHOD = "lplr-convert"  # config.json quantization_config.quant_method

# Files in an output directory.
MANIFEST_FILE = "lplr_manifest.json"
PROGRESS_FILE = "lplr_progress.json"  # journal of finished shards, removed when the conversion completes
REPORT_JSON = "lplr_report.json"
REPORT_CSV = "lplr_report.csv"
REPORT_MD = "lplr_report.md"
PLOT_ERROR = "lplr_error_per_layer.png"
PLOT_OUTPUT_ERROR = "lplr_output_error_per_layer.png"  # with calibration
PLOT_BITS = "lplr_bits_per_layer.png"
PLOT_SPECTRUM = "lplr_spectrum.png"
MODEL_CARD = "README.md"
LOCK_FILE = ".lplr_convert.lock"  # held (flock) by the one run writing a directory; names the holder
# Every file name above that this tool writes into an output directory beside the shards and copied files.
OWN_FILES = (MANIFEST_FILE, PROGRESS_FILE, REPORT_JSON, REPORT_CSV, REPORT_MD, PLOT_ERROR, PLOT_OUTPUT_ERROR,
             PLOT_BITS, PLOT_SPECTRUM)
CONFIG_FILE = "config.json"
# config.json "transformers_weights" (transformers' explicit weights file) names a file that does not exist, so that
# plain transformers fails loudly, naming it, instead of loading random weights; the lplr-convert quantizer, which
# `import lplr_convert` registers, removes the field before transformers looks for weights.
CONFIG_WEIGHTS_KEY = "transformers_weights"
IMPORT_GUARD_FILE = "lplr-convert_needs_import_lplr_convert_before_from_pretrained.safetensors"

# `lplr-convert export`: the record an export writes beside its files (what it wrote, which tensors went dense, why),
# which is also what `export --overwrite` may delete.
EXPORT_FILE = "lplr_export.json"
# Written first by an export or decompress, removed after EXPORT_FILE: the names it may write, so that `--overwrite`
# knows the leftovers of one that was killed as its own.
EXPORT_PROGRESS = "lplr_export_progress.json"
EXPORT_FORMATS = ("compressed-tensors", "peft")  # `export --format`, recorded in EXPORT_FILE
DENSE_EXPORT = "dense"  # the format `decompress` records in EXPORT_FILE
# compressed-tensors' `pack-quantized` format (config.json quantization_config and per-module tensor suffixes).
CT_QUANT_METHOD = EXPORT_FORMATS[0]
CT_FORMAT = "pack-quantized"
CT_STATUS = "compressed"
CT_PACKED = "weight_packed"  # int32 words, each row's codes little end first (math.bitpack.pack_rows_int32)
CT_SCALE = "weight_scale"  # (out, 1) channel, (out, groups) group, (1,) tensor
CT_ZERO_POINT = "weight_zero_point"  # asymmetric: int32 words packed along the output dim (channel/group), int8 (1,)
CT_SHAPE = "weight_shape"  # int64 (out, in)
# PEFT LoRA adapter.
PEFT_EXPORT = EXPORT_FORMATS[1]
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # "<prefix><module>.lora_A.weight" (r x in), ".lora_B.weight" (out x r)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SHARD_TEMPLATE = "model-{index:05d}-of-{total:05d}.safetensors"
PARTIAL_SHARD_TEMPLATE = "model-{index:05d}.safetensors.partial"
PARTIAL_SUFFIX = ".partial"
DATA_SUFFIX = ".data"

# Safetensors header metadata.
META_FORMAT_KEY = "format"
META_FORMAT_VALUE = "pt"
META_TOOL_KEY = "lplr_convert_format"

# Stored tensor names: "<weight name>.<part>.<field>" for quantized parts, "<weight name>.<part>" for float parts.
PART_LEFT = "lplr_left"  # L, out x rank
PART_RIGHT = "lplr_right"  # R, rank x in
PART_QUANT = "lplr_q"  # a directly quantized weight (rtn)
FIELD_FLOAT = ""  # a 16/32-bit float part is stored under "<weight name>.<part>" itself, with no field suffix
FIELD_PACKED = "packed"  # uint8, bit-packed codes
FIELD_SCALE = "scale"  # step per scale group: float32, or float16 where the part's spec says scale_dtype float16
FIELD_ZERO = "zero"  # float32 value of code 0 per scale group (the published min-max quantizer, scheme "minmax")
FIELD_ZERO_POINT = "zero_point"  # uint8, bit-packed integer zero points at the codes' width (scheme "asymmetric")

# A tensor record's info key of an incoherence transform ({"kind": "hadamard", "seed": int}): the stored parts are
# of W' = U W V^T and every loader returns U^T W' V (`math.hadamard.Incoherence`). Absent: none.
INFO_INCOHERENCE = "incoherence"

# Manifest keys (top level).
M_FORMAT_VERSION = "format_version"
M_TOOL = "tool"
M_TOOL_VERSION = "tool_version"
M_SOURCE = "source"
M_OPTIONS = "options"
M_TENSORS = "tensors"
M_SUMMARY = "summary"
M_SHARDS = "shards"
M_FILES = "files"
M_COMPLETE = "complete"
M_EVAL = "eval"
M_INTEGRITY = "integrity"  # sha256 of the canonical JSON of tensors + shards
M_REPORT = "report"  # the report files written after the manifest: {name: {sha256, bytes}}
M_DIGESTS = "digests"  # {top-level key: sha256 of its canonical JSON} for every other key: the whole manifest

TOOL_NAME = "lplr-convert"

# Calibration statistics (`lplr-convert calibrate`): a STATS directory of per-block safetensors files plus a manifest.
CALIB_FORMAT_VERSION = "1.0"
CALIB_KIND = "calibration-statistics"
CALIB_MANIFEST = "lplr_calibration.json"
CALIB_FILE_TEMPLATE = "lplr_stats-{block:05d}.safetensors"
CALIB_FILE_PATTERN = r"lplr_stats-\d{5}\.safetensors"
CALIB_KEY_SUFFIX = "input_moment"  # statistic key: "<checkpoint module name of the first layer>.input_moment"
# `calibrate --sensitivity-samples N` (causal LMs): each block linear's output sensitivity, the mean squared gradient
# of the next-token loss per output channel, one float32 vector per weight keyed "<weight's module name>.<suffix>".
CALIB_SENSITIVITY_FILE = "lplr_sensitivity.safetensors"
CALIB_SENSITIVITY_SUFFIX = "output_sensitivity"
# An interrupted calibrate run (`calibrate --resume`): its journal, and the hidden states after its first N block
# runs (the input of the next), one tensor per batch; both are removed when the run completes.
CALIB_PROGRESS = "lplr_calibration_progress.json"
CALIB_HIDDEN_TEMPLATE = "lplr_calibration_hidden-{runs:05d}.safetensors"
CALIB_HIDDEN_PATTERN = r"lplr_calibration_hidden-\d{5}\.safetensors"
CALIB_HIDDEN_KEY = "hidden.{batch:05d}"
S_KIND = "kind"
S_TEXT = "text"
S_STATISTICS = "statistics"
S_WEIGHTS = "weights"
S_SENSITIVITY = "sensitivity"

# The records this tool writes beside its outputs: never copied from a source into an output (a copied record would
# describe files of another directory).
RECORD_FILES = (*OWN_FILES, EXPORT_FILE, EXPORT_PROGRESS, CALIB_MANIFEST, CALIB_PROGRESS)
# The records that mark a directory as an output of this tool (a conversion, an export or decompress, STATS), finished
# or interrupted.
MARKER_FILES = (MANIFEST_FILE, PROGRESS_FILE, EXPORT_FILE, EXPORT_PROGRESS, CALIB_MANIFEST, CALIB_PROGRESS)

# Every network wait of the tool (Hub requests of push and of --in-path OWNER/NAME, connecting to a Ray cluster) ends
# after this many seconds without an answer (default NETWORK_TIMEOUT_DEFAULT) in a one-line error. huggingface_hub's
# own file transfers also honour HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT.
NETWORK_TIMEOUT_ENV = "LPLR_NETWORK_TIMEOUT"
NETWORK_TIMEOUT_DEFAULT = 60.0
