"""surgery.core: the ground floor of surgery: errors, small utilities, file schemas, value specs, recipes,
trust, plugins, the one registry helper and where modules moved. It imports torch and nothing else of
surgery; everything above may import it.
"""
