"""Files: Hugging Face model directories (``hf``), sharded safetensors (``checkpoint``), the plan's
two serializations (``plan_format``), and LoRD model directories (``io``)."""
