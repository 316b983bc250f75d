from setuptools import setup

PACKAGES = {
    "secure_split": "secure_split",
    "secure_split.passes": "passes",
    "secure_split.partitioner": "partitioner",
    "secure_split.runtime": "runtime",
    "secure_split.enclave_runtime": "enclave_runtime",
}

setup(
    name="secure_split",
    version="0.1.0",
    description="A PyTorch compiler plugin for confidential split inference (enclave + untrusted GPU).",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"secure_split.runtime": ["*.proto"], "secure_split.enclave_runtime": ["gramine/*.template"]},
    entry_points={
        "torch_dynamo_backends": ["secure_split = secure_split.backend:secure_split_backend"],
        "console_scripts": ["secure-split = secure_split.cli:main"],
    },
)
