# Worker image for Dataflow (and any portable runner's Docker environment): Beam's own Python SDK
# image at the Beam and Python versions pyproject.toml pins, plus featurebeam and its dependencies,
# so workers start without pip-installing TensorFlow. tests/test_dockerfile.py checks the tag.
#   docker build -t REGION-docker.pkg.dev/PROJECT/images/featurebeam:0.1.0 .
#   python -m pipelines.extract ... --runner=DataflowRunner \
#       --sdk_container_image=REGION-docker.pkg.dev/PROJECT/images/featurebeam:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0

# ffmpeg decodes AAC/M4A; everything else is decoded by the libsndfile inside the soundfile wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src

# The SDK image's entrypoint (/opt/apache/beam/boot) stays: it is what Dataflow starts.
