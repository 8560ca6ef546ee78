// TrtglmResidualNorm: out = norm(input [+ residual]) over the last axis, RMSNorm or LayerNorm, optionally quantized
// to INT8 with a per-tensor scale; residual_out = input + residual (the next layer's residual). See README.md.
#pragma once

#include "common/plugin.h"

namespace trtglm
{

class ResidualNormPlugin : public PluginBase<ResidualNormPlugin>
{
public:
    static constexpr char const* kNAME = "TrtglmResidualNorm";

    ResidualNormPlugin(FieldReader const& fields, bool& ok) noexcept;
    ResidualNormPlugin(ResidualNormPlugin const&) = default;
    static void fieldNames(std::vector<char const*>& names);
    void fields(FieldWriter& w) const;

    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

private:
    int32_t nbInputs() const noexcept { return 2 + mHasResidual + mHasBeta; }

    int32_t mKind = 0;        // 0: RMSNorm, 1: LayerNorm
    float mEps = 1e-5f;
    int32_t mHasResidual = 0; // 1: input 1 is the residual, output 1 is input + residual
    int32_t mHasBeta = 0;     // LayerNorm: the last input is beta
    float mOutScale = 0.f;    // > 0: output 0 is INT8, clamp(round(y / out_scale))
};

} // namespace trtglm
