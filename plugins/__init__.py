"""lord_export_plugins: thin adapters that plug lord_export into other tools' discovery mechanisms.

Installed as the package ``lord_export_plugins`` (see setup.cfg). Each module translates the host
tool's calling convention into one lord_export call; the logic lives in the library.
"""
