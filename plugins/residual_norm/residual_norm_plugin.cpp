#include "residual_norm/residual_norm_plugin.h"

namespace trtglm
{

ResidualNormPlugin::ResidualNormPlugin(FieldReader const& f, bool& ok) noexcept
{
    f.get("kind", mKind);
    f.get("eps", mEps);
    f.get("has_residual", mHasResidual);
    f.get("has_beta", mHasBeta);
    f.get("out_scale", mOutScale);
    ok = (mKind == 0 || mKind == 1) && mEps >= 0.f && (mHasResidual == 0 || mHasResidual == 1)
        && (mHasBeta == 0 || (mHasBeta == 1 && mKind == 1)) && mOutScale >= 0.f;
    if (!ok)
    {
        logError("TrtglmResidualNorm: kind must be 0 (rms) or 1 (layer), has_residual/has_beta 0 or 1 (beta only "
                 "for layer), eps and out_scale >= 0");
    }
}

void ResidualNormPlugin::fieldNames(std::vector<char const*>& names)
{
    names = {"kind", "eps", "has_residual", "has_beta", "out_scale"};
}

void ResidualNormPlugin::fields(FieldWriter& w) const
{
    w.add("kind", &mKind);
    w.add("eps", &mEps);
    w.add("has_residual", &mHasResidual);
    w.add("has_beta", &mHasBeta);
    w.add("out_scale", &mOutScale);
}

int32_t ResidualNormPlugin::getNbOutputs() const noexcept
{
    return 1 + mHasResidual;
}

int32_t ResidualNormPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != getNbOutputs() || !isFloat(inputTypes[0]))
    {
        return -1;
    }
    outputTypes[0] = mOutScale > 0.f ? nvinfer1::DataType::kINT8 : inputTypes[0];
    if (mHasResidual)
    {
        outputTypes[1] = inputTypes[0];
    }
    return 0;
}

int32_t ResidualNormPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept
{
    if (nbInputs != this->nbInputs() || nbOutputs != getNbOutputs() || inputs[0].nbDims < 1)
    {
        return -1;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outputs[i] = inputs[0];
    }
    return 0;
}

bool ResidualNormPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t) noexcept
{
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return isFloat(d.type);
    }
    if (pos == nbInputs && mOutScale > 0.f) // output 0, quantized
    {
        return d.type == nvinfer1::DataType::kINT8;
    }
    return d.type == inOut[0].desc.type; // residual, gamma, beta, output 0 (float), residual_out
}

int32_t ResidualNormPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& dims = inputDesc[0].dims;
    ResidualNormParams p;
    p.hidden = static_cast<int32_t>(dims.d[dims.nbDims - 1]);
    p.rows = p.hidden > 0 ? volume(dims) / p.hidden : 0;
    int32_t i = 0;
    p.input = inputs[i++];
    p.residual = mHasResidual ? inputs[i++] : nullptr;
    p.gamma = inputs[i++];
    p.beta = mHasBeta ? inputs[i++] : nullptr;
    p.output = outputs[0];
    p.residual_out = mHasResidual ? outputs[1] : nullptr;
    p.eps = mEps;
    p.out_scale = mOutScale > 0.f ? mOutScale : 1.f;
    p.kind = mKind == 1 ? NormKind::kLAYER : NormKind::kRMS;
    if (!toDType(inputDesc[0].type, p.dtype))
    {
        return -1;
    }
    p.out_dtype = mOutScale > 0.f ? DType::kINT8 : p.dtype;
    return launchResidualNorm(p, stream) == cudaSuccess ? 0 : -1;
}

} // namespace trtglm
