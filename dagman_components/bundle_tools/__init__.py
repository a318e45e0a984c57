"""Bundle tooling: checks of config values, the model zoo's checks, packaging, and ONNX export.

- :mod:`~dagman_components.bundle_tools.config_checks`: checks a config's ``initialize`` runs first;
- :mod:`~dagman_components.bundle_tools.zoo_checks`: what the model zoo's CI verifies;
- :mod:`~dagman_components.bundle_tools.package`: ``check_bundle`` and ``package_bundle`` (zip);
- :mod:`~dagman_components.bundle_tools.deploy`: ONNX export and its check against eager PyTorch.
"""

from dagman_components.bundle_tools import config_checks, deploy, package, zoo_checks

__all__ = ["config_checks", "deploy", "package", "zoo_checks"]
