"""Other libraries taught about LoRD: transformers' ``from_pretrained`` (``transformers``) and PEFT's
LoRA (``peft``), registered without importing them (``import_hooks``)."""
