# vesl worker image: the one container for Ray nodes, Dataflow workers and Flink/Spark SDK harnesses.
#
# NOT BUILT IN CI HERE: the CI machine has no network beyond package registries and no Docker daemon.
# Build and push it yourself:
#   docker build -t REGISTRY/vesl:0.1.0 .
#   docker push REGISTRY/vesl:0.1.0
# Usage per engine: docs/cluster.md.
#
# - CUDA runtime base (the GPU stages: VLM captioner, OWLv2 / Grounding DINO detector, vLLM).
# - Python 3.11 with vesl and its ray, beam and vllm extras (vLLM brings its matching CUDA torch).
# - Beam: the SDK harness boot binary from Beam's official image of the *same* Beam version as
#   installed below (the launcher and the workers must agree); it is the default ENTRYPOINT, as
#   Dataflow and portable runners (Flink, Spark) with --environment_type=DOCKER expect.
# - Ray: override the entrypoint, e.g. `docker run --entrypoint ray IMAGE start --head ...`
#   (KubeRay sets the command itself).

ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG BEAM_VERSION
ARG PYTHON_VERSION

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/vesl \
    PATH=/opt/vesl/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates curl git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python${PYTHON_VERSION} -m venv /opt/vesl \
 && pip install -U pip setuptools wheel

WORKDIR /opt/vesl-src
# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
COPY vesl ./vesl
COPY schemas ./schemas
COPY labelers ./labelers
COPY pipeline ./pipeline
COPY pretrain ./pretrain
RUN pip install ".[ray,beam,vllm]" "apache-beam[gcp]==${BEAM_VERSION}" \
 && python -c "import vesl, apache_beam, ray, vllm, torch; print('vesl', vesl.__version__, 'beam', apache_beam.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# Models: pass hub ids (workers need network to the hub) or bake weights into the image, e.g.
#   COPY models/ /models/   and label with --captioner hf:/models/qwen2-vl --detector owlv2:/models/owlv2
# Set HF_HUB_OFFLINE=1 at run time when the weights are baked in.

COPY --from=beam /opt/apache/beam /opt/apache/beam
WORKDIR /workspace
ENTRYPOINT ["/opt/apache/beam/boot"]
