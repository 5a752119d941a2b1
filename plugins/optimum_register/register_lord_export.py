# Installed as optimum/commands/register/register_lord_export.py (see setup.cfg): optimum-cli imports
# every file of that namespace folder before it builds its parsers. This one adds the LoRD flags to
# `optimum-cli export onnx`; it registers no command of its own. Kept import-light: the work is in
# lord_export_plugins.optimum_cli, imported here, and lord_export, imported only when a flag is used.
from lord_export_plugins.optimum_cli import install

install()

REGISTER_COMMANDS = []
