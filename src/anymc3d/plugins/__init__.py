"""Per-task plugin: LoRA adapters, task-query pooling, head, and the plugin file format."""
from .file import load_plugin, read_spec, save_plugin
from .lora import LoraSpec
from .pooling import TaskQueryPool
from .spec import PluginSpec

__all__ = ["LoraSpec", "PluginSpec", "TaskQueryPool", "load_plugin", "read_spec", "save_plugin"]
