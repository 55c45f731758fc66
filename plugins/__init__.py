"""
Pluggable parts of mmogate behind the interfaces of L{gate.interfaces},
installed as the C{mmogate_plugins} package.
"""
