"""The Flex Template launcher's Python file (FLEX_TEMPLATE_PYTHON_PY_FILE in the repository's Dockerfile).

Dataflow runs `python flex_launch.py --name=value ...` in the template's image at every launch,
with the launch parameters and its own options; featurebeam's launch decides the run, submits
the job and exits (pipelines/template.py). It lives outside the packages so that running it as
a script puts no package folder on sys.path.
"""

import sys

from pipelines import template

if __name__ == "__main__":
    sys.exit(template.main())
