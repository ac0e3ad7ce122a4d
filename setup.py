from setuptools import find_packages, setup

setup(
    name="d2_defects",
    version="0.1.0",
    description="Detectron2 plugin for industrial defect detection",
    packages=find_packages(include=["d2_defects", "d2_defects.*"]),
    python_requires=">=3.9",
    install_requires=[
        # torch, torchvision and detectron2 are installed by bootstrap.sh (or brought by the user).
        "fvcore",
        "iopath",
        "numpy",
        "opencv-python-headless",
        "pycocotools",
        "faster-coco-eval",
        "timm",
        "ensemble-boxes",
        "numba",
        "matplotlib",
        "tqdm",
        "pyyaml",
        "submitit",
    ],
    extras_require={
        # ONNX / OpenVINO export and their runtimes (bootstrap.sh installs them from requirements.txt)
        "deploy": ["onnx", "onnxruntime", "openvino"],
    },
)
