# Worker image for Dataflow (and any portable runner's Docker environment): Beam's own Python SDK
# image at the Beam and Python versions pyproject.toml pins, plus featurebeam and its dependencies,
# so workers start without pip-installing TensorFlow. The same image launches featurebeam's Flex
# Template (pipelines/template.py): it carries Dataflow's Python template launcher, which runs
# docker/flex_launch.py at every launch. tests/test_dockerfile.py checks the tags and paths.
#   docker build -t REGION-docker.pkg.dev/PROJECT/images/featurebeam:0.1.0 .
#   python -m pipelines.extract ... --runner=DataflowRunner \
#       --sdk_container_image=REGION-docker.pkg.dev/PROJECT/images/featurebeam:0.1.0
#   python -m pipelines.extract ... --flex_template=gs://BUCKET/templates/featurebeam.json \
#       --sdk_container_image=REGION-docker.pkg.dev/PROJECT/images/featurebeam:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0

# ffmpeg decodes AAC/M4A; everything else is decoded by the libsndfile inside the soundfile wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src

# Flex Template launcher: Dataflow starts this image on a launcher VM, where this binary runs
# FLEX_TEMPLATE_PYTHON_PY_FILE with the launch's parameters. Google publishes the binary only in
# its launcher base images (one per Python minor version; the tag follows Google's releases).
COPY --from=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest \
    /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
COPY docker/flex_launch.py /opt/featurebeam/flex_launch.py
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/featurebeam/flex_launch.py

# The SDK image's entrypoint (/opt/apache/beam/boot) stays: it is what Dataflow starts on workers.
